//! The `payments.v1` protocol of the gRPC example, shared by `examples/grpc/grpc_server.rs`,
//! `examples/grpc/grpc_client.rs` and `examples/grpc/tests/grpc.rs` (included with `#[path]`).
//!
//! The protocol itself is `examples/grpc/proto/payments.proto`. Its messages are written out
//! here by hand, as `prost` derives them, so that no `protoc` is needed to build; the test
//! `the_rust_messages_match_the_proto` below compares every field's name, type and number with
//! the `.proto` file.
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
    /// Answer with a receipt of this many bytes.
    #[prost(uint32, tag = "5")]
    pub receipt_bytes: u32,
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
    /// `receipt_bytes` bytes, when asked for.
    #[prost(bytes, tag = "5")]
    pub receipt: Vec<u8>,
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

#[cfg(test)]
mod tests {
    /// Every message field of `proto/payments.proto` (`message`, type, name, number), and the
    /// methods' paths, as the hand-written code above declares them.
    #[test]
    fn the_rust_messages_match_the_proto() {
        let proto = include_str!("proto/payments.proto");
        let code = include_str!("payments.rs");
        let code = &code[..code.find("#[cfg(test)]").unwrap()];
        let mut checked = 0;
        let mut message = "";
        for line in proto.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("message ") {
                message = rest.split_whitespace().next().unwrap();
                let declared = format!("/// `payments.v1.{message}`.\n#[derive(Clone, PartialEq, prost::Message)]\npub struct {message} ");
                assert!(code.contains(&declared), "no struct for message {message}");
                continue;
            }
            if let Some(rest) = line.strip_prefix("rpc ") {
                let method = rest.split('(').next().unwrap();
                let path = format!("\"/payments.v1.Payments/{method}\"");
                assert!(code.contains(&path), "no path for method {method}");
                checked += 1;
                continue;
            }
            let words: Vec<&str> = line.trim_end_matches(';').split_whitespace().collect();
            if let [kind, name, "=", number] = words[..] {
                let attribute = format!("#[prost({kind}, tag = \"{number}\")]");
                let struct_start = code.find(&format!("pub struct {message} ")).unwrap();
                let body = &code[struct_start..];
                let body = &body[..body.find('}').unwrap()];
                let field = format!("{attribute}\n    pub {name}: ");
                assert!(
                    body.contains(&field),
                    "{message}.{name}: no field `{attribute} pub {name}`"
                );
                checked += 1;
            }
        }
        assert_eq!(checked, 3 + 5 + 5 + 1 + 1 + 1, "every method and field");
    }
}
