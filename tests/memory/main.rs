//! The tests that measure the memory of their process: a binary of their own, since the
//! resident memory of the large integration-test binary (`tests/it`) grows in other ways too
//! (measured: 5 MiB more for the same 16,000 records). Each measurement runs in a child
//! process of this binary, started with `--exact` on the measuring test.

mod decoded;
mod footprint;
