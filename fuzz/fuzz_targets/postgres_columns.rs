#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tower_idempotency::__fuzz::postgres_columns(data);
});
