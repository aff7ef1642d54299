//! amqp-value-json through a real broker: a headers table built by the crate is
//! published, consumed, and maps back to the same JSON.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use mosaic_tests::amqp::Listener;
use mosaic_tests::{broker, within};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(20);

fn every_shape() -> Value {
    json!({
        "string": "hello",
        "empty_string": "",
        "unicode_ключ_🔑": "värde ✓ 🛰",
        "long_string": "x".repeat(70_000),
        "zero": 0,
        "small": 7,
        "negative": -129,
        "i32_max": i32::MAX,
        "i32_min_minus_one": i64::from(i32::MIN) - 1,
        "i64_max": i64::MAX,
        "i64_min": i64::MIN,
        "float": 3.25,
        "tiny_float": 5e-324,
        "huge_float": 1.7976931348623157e308,
        "negative_float": -0.5,
        "true": true,
        "false": false,
        "null": null,
        "array": [1, "two", 3.5, false, null, [[]], {"k": "v"}],
        "empty_array": [],
        "empty_object": {},
        "nested": {"a": {"b": {"c": {"d": {"e": [1, {"f": "deep"}]}}}}},
    })
}

#[tokio::test]
async fn a_table_of_every_json_shape_survives_the_broker() {
    let vhost = broker().vhost("amqp-value-json").await;
    let mut listener = Listener::start(&vhost.amqp_url, "", &[]).await;

    let Value::Object(sent) = every_shape() else {
        unreachable!()
    };
    let headers = amqp_value_json::to_field_table(&sent).unwrap();
    let confirm = listener
        .ch
        .basic_publish(
            "".into(),
            listener.queue.clone(),
            BasicPublishOptions::default(),
            b"{}",
            BasicProperties::default().with_headers(headers),
        )
        .await
        .unwrap();
    assert!(
        within(T, "publisher confirm", confirm)
            .await
            .unwrap()
            .is_ack()
    );

    let delivery = within(T, "the message back", listener.consumer.next())
        .await
        .expect("consumer ended")
        .expect("a delivery");
    let got = delivery
        .properties
        .headers()
        .as_ref()
        .expect("headers survived");
    let back = amqp_value_json::from_field_table(got).unwrap();
    assert_eq!(Value::Object(back), Value::Object(sent));

    // The connection is still healthy: a ShortString value would have killed it.
    assert!(listener.conn.status().connected());
    listener.conn.close(200, "done".into()).await.unwrap();
}
