//! Converting a typical 20-field device envelope both ways.
//!
//! Run with `cargo bench -p amqp-value-json`.

use std::hint::black_box;

use amqp_value_json::{from_field_table, from_table, to_field_table, to_table};
use criterion::{Criterion, criterion_group, criterion_main};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Location {
    lat: f64,
    lon: f64,
    accuracy_m: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Envelope {
    message_id: String,
    correlation_id: String,
    device_id: String,
    tenant_id: String,
    session_id: String,
    kind: String,
    schema: String,
    seq: u64,
    sent_at_ms: i64,
    received_at_ms: i64,
    ttl_ms: u32,
    priority: u8,
    temperature: f64,
    battery: f64,
    rssi: i32,
    online: bool,
    retry_of: Option<String>,
    firmware: String,
    location: Location,
    tags: Vec<String>,
}

fn envelope() -> Envelope {
    Envelope {
        message_id: "0192f5a4-7c1e-7d3a-9b7e-3f1c2a4d5e6f".into(),
        correlation_id: "6f1e2d3c-4b5a-4978-8a1b-2c3d4e5f6a7b".into(),
        device_id: "c0ffee00-1234-4abc-8def-0123456789ab".into(),
        tenant_id: "acme".into(),
        session_id: "0192f5a4-7c1e-7d3a-9b7e-000000000001".into(),
        kind: "telemetry".into(),
        schema: "mosaic.telemetry.v1".into(),
        seq: 184_467,
        sent_at_ms: 1_763_780_000_123,
        received_at_ms: 1_763_780_000_456,
        ttl_ms: 30_000,
        priority: 4,
        temperature: 21.75,
        battery: 0.83,
        rssi: -67,
        online: true,
        retry_of: None,
        firmware: "2.14.1+build.7".into(),
        location: Location {
            lat: 48.858_37,
            lon: 2.294_481,
            accuracy_m: 12,
        },
        tags: vec!["floor-3".into(), "hvac".into(), "north-wing".into()],
    }
}

fn bench(c: &mut Criterion) {
    let typed = envelope();
    let json: Map<String, Value> = match json!(typed) {
        Value::Object(object) => object,
        _ => unreachable!("a struct serializes as an object"),
    };
    assert_eq!(json.len(), 20);
    let table = to_field_table(&json).expect("envelope converts");

    c.bench_function("json_to_table", |b| {
        b.iter(|| to_field_table(black_box(&json)).expect("converts"))
    });
    c.bench_function("table_to_json", |b| {
        b.iter(|| from_field_table(black_box(&table)).expect("converts"))
    });
    c.bench_function("serde_to_table", |b| {
        b.iter(|| to_table(black_box(&typed)).expect("converts"))
    });
    c.bench_function("serde_from_table", |b| {
        b.iter(|| from_table::<Envelope>(black_box(&table)).expect("converts"))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
