//! Revocations loaded into the `mosaic.revocations` stream before a gateway starts,
//! in the format device-service's outbox publishes them (`mosaic_protocol::registry`),
//! and the gateway's own count of what it replayed.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use lapin::BasicProperties;
use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use mosaic_protocol::registry as wire;
use serde_json::Map;
use uuid::Uuid;

use crate::baseline::confirm_channel;

/// Bound on publishing the whole load.
const LOAD_TIMEOUT: Duration = Duration::from_secs(300);
/// Publishes awaiting their confirm at once.
const WINDOW: usize = 256;

/// The stream's arguments, as device-service and the gateways declare it (a
/// different set would make their declarations fail).
fn stream_arguments() -> FieldTable {
    let mut t = FieldTable::default();
    let long = |s: &str| AMQPValue::LongString(LongString::from(s));
    t.insert("x-queue-type".into(), long("stream"));
    t.insert("x-max-age".into(), long(wire::REVOCATIONS_MAX_AGE));
    t
}

/// One revocation as device-service's outbox publishes it: default exchange,
/// routing key = the stream, headers `kind`, `device`, `revoked_at` (Unix seconds),
/// a `message_id`, JSON content type, persistent, body `null`.
fn revocation(device: Uuid, revoked_at: i64) -> anyhow::Result<BasicProperties> {
    let mut h = Map::new();
    h.insert("kind".into(), wire::KIND_REVOCATION.into());
    h.insert(wire::DEVICE.into(), device.to_string().into());
    h.insert(wire::REVOKED_AT.into(), revoked_at.into());
    Ok(BasicProperties::default()
        .with_headers(amqp_value_json::to_field_table(&h)?)
        .with_message_id(ShortString::from(Uuid::now_v7().to_string()))
        .with_content_type(ShortString::from("application/json"))
        .with_delivery_mode(2))
}

/// Declares the stream on `amqp` (a vhost's URL) and appends `n` revocations of
/// fresh device ids (none of them a device that connects), confirmed, up to
/// 256 unconfirmed at a time; seconds it took.
pub async fn load(amqp: &str, n: usize) -> anyhow::Result<f64> {
    let (conn, ch) = confirm_channel(amqp).await?;
    ch.queue_declare(
        wire::REVOCATIONS_STREAM.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        stream_arguments(),
    )
    .await?;
    let revoked_at = time::OffsetDateTime::now_utc().unix_timestamp();
    let started = Instant::now();
    let publish = async {
        let mut window = VecDeque::new();
        for _ in 0..n {
            let confirm = ch
                .basic_publish(
                    "".into(),
                    wire::REVOCATIONS_STREAM.into(),
                    BasicPublishOptions::default(),
                    b"null",
                    revocation(Uuid::new_v4(), revoked_at)?,
                )
                .await?;
            window.push_back(confirm);
            if window.len() >= WINDOW {
                let c = window.pop_front().expect("not empty").await?;
                anyhow::ensure!(c.is_ack(), "the broker refused a revocation");
            }
        }
        for c in window {
            anyhow::ensure!(c.await?.is_ack(), "the broker refused a revocation");
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(LOAD_TIMEOUT, publish)
        .await
        .map_err(|_| anyhow::anyhow!("{n} revocations not confirmed within {LOAD_TIMEOUT:?}"))??;
    let seconds = started.elapsed().as_secs_f64();
    let _ = conn.close(200, "done".into()).await;
    Ok(seconds)
}

/// The gateway's `mosaic_ws_revoked_devices` gauge (devices with a revocation it
/// knows of) from its `/metrics`; 0 when it has none yet (the gauge is set at the
/// first revocation).
pub async fn gateway_count(addr: std::net::SocketAddr) -> anyhow::Result<u64> {
    Ok(metric(addr, "mosaic_ws_revoked_devices")
        .await?
        .unwrap_or(0.0) as u64)
}

/// An unlabelled metric of the service at `addr`, from its `/metrics`.
pub async fn metric(addr: std::net::SocketAddr, name: &str) -> anyhow::Result<Option<f64>> {
    let text = reqwest::Client::new()
        .get(format!("http://{addr}/metrics"))
        .timeout(Duration::from_secs(10))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    Ok(gauge(&text, name))
}

/// The value of an unlabelled gauge in Prometheus text.
fn gauge(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (n, v) = l.split_once(' ')?;
        (n == name).then(|| v.trim().parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn headers_of(p: &BasicProperties) -> Value {
        let t = p.headers().as_ref().expect("headers");
        Value::Object(amqp_value_json::from_field_table(t).expect("JSON headers"))
    }

    #[test]
    fn a_revocation_is_what_the_gateway_reads() {
        let d = Uuid::new_v4();
        let p = revocation(d, 1_700_000_000).unwrap();
        let h = headers_of(&p);
        assert_eq!(h["kind"], "revocation");
        assert_eq!(h["device"], d.to_string());
        // The gateway reads `revoked_at` with `as_u64`: an integer, not a string.
        assert_eq!(h["revoked_at"].as_u64(), Some(1_700_000_000));
        assert_eq!(*p.delivery_mode(), Some(2));
    }

    #[test]
    fn gauges_are_read_from_prometheus_text() {
        let text = "# TYPE mosaic_ws_revoked_devices gauge\nmosaic_ws_revoked_devices 10000\nmosaic_ws_revoked_devices_x 3\n";
        assert_eq!(gauge(text, "mosaic_ws_revoked_devices"), Some(10000.0));
        assert_eq!(gauge("", "mosaic_ws_revoked_devices"), None);
    }
}
