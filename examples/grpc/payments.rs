//! The `payments.v1` protocol of the gRPC example, shared by `examples/grpc/grpc_server.rs` and
//! `examples/grpc/tests/grpc.rs` (included with `#[path]`). Written out by hand, as `prost` derives it, so
//! that no `protoc` is needed to build:
//!
//! ```proto
//! syntax = "proto3";
//! package payments.v1;
//!
//! service Payments {
//!   rpc Create(CreatePaymentRequest) returns (Payment);
//!   rpc Stats(StatsRequest) returns (Stats);
//!   // Not part of the contract: a server-streaming call, to show that streams pass through.
//!   rpc Ticks(TicksRequest) returns (stream Tick);
//! }
//! message CreatePaymentRequest { int64 amount = 1; string currency = 2; bool fail = 3; uint32 delay_ms = 4; }
//! message Payment { string id = 1; int64 amount = 2; string currency = 3; string tenant = 4; }
//! message StatsRequest {}
//! message Stats { uint64 executions = 1; }
//! message TicksRequest { uint32 count = 1; }
//! message Tick { uint32 n = 1; }
//! ```
#![allow(dead_code)]

/// `payments.v1.CreatePaymentRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CreatePaymentRequest {
    /// The amount, in minor units.
    #[prost(int64, tag = "1")]
    pub amount: i64,
    /// ISO 4217 code.
    #[prost(string, tag = "2")]
    pub currency: String,
    /// Answer `INTERNAL` after counting an execution.
    #[prost(bool, tag = "3")]
    pub fail: bool,
    /// Sleep this long before answering.
    #[prost(uint32, tag = "4")]
    pub delay_ms: u32,
}

/// `payments.v1.Payment`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Payment {
    /// `pay_…`, unique per execution.
    #[prost(string, tag = "1")]
    pub id: String,
    /// As requested.
    #[prost(int64, tag = "2")]
    pub amount: i64,
    /// As requested.
    #[prost(string, tag = "3")]
    pub currency: String,
    /// From `authorization: Bearer <tenant>`.
    #[prost(string, tag = "4")]
    pub tenant: String,
}

/// `payments.v1.StatsRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StatsRequest {}

/// `payments.v1.Stats`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Stats {
    /// How many times `Create` really ran.
    #[prost(uint64, tag = "1")]
    pub executions: u64,
}

/// `payments.v1.TicksRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TicksRequest {
    /// How many ticks to stream.
    #[prost(uint32, tag = "1")]
    pub count: u32,
}

/// `payments.v1.Tick`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Tick {
    /// 1, 2, …
    #[prost(uint32, tag = "1")]
    pub n: u32,
}

/// The service's full name.
pub const SERVICE: &str = "payments.v1.Payments";
/// Method paths.
pub const CREATE: &str = "/payments.v1.Payments/Create";
pub const STATS: &str = "/payments.v1.Payments/Stats";
pub const TICKS: &str = "/payments.v1.Payments/Ticks";
