//! One gateway phase of the registry scenario: a fresh replica on a vhost whose
//! revocations stream is empty or loaded, checked to have replayed it, then the
//! idle scenario's connects.

use std::time::{Duration, Instant};

use super::revocations;
use crate::procfs::{self, cpu_secs, steady_rss_kib};
use crate::scenario::{CpuShares, Ctx, Held, gateway_target};

/// One gateway phase's readings.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Boot {
    /// `empty` or `loaded`.
    pub stream: &'static str,
    /// Which round, from 1.
    pub round: usize,
    /// From starting the process to `/readyz` 200 (the stream replayed).
    pub ready_s: f64,
    /// The gateway's `mosaic_ws_revoked_devices` when ready.
    pub replayed: u64,
    /// RSS when ready, before any device.
    pub rss_ready_kib: u64,
    /// RSS with the devices connected.
    pub rss_after_kib: u64,
    /// Whether that reading was steady.
    pub rss_steady: bool,
    /// Devices connected.
    pub open: usize,
    /// Connects refused or failed.
    pub failed: usize,
    /// Why the first failure failed.
    pub first_error: Option<String>,
    /// Connects per second.
    pub connect_rate: f64,
    /// RSS growth per connected device.
    pub rss_per_device_kib: f64,
    /// The gateway's CPU per connect.
    pub gateway_cpu_us_per_connect: f64,
    /// Cores each process used during the connects.
    pub cores: serde_json::Value,
    /// The same, in words.
    #[serde(skip)]
    pub limit: String,
    /// Ready times, seconds from the first connect (for the plot).
    #[serde(skip)]
    pub offsets: Vec<f64>,
}

/// Starts a gateway on `vh`, checks it replayed `expect` revocations, connects `n`
/// devices and measures.
pub async fn boot(
    ctx: &Ctx<'_>,
    vh: &mosaic_tests::Vhost,
    n: usize,
    expect: usize,
    stream: &'static str,
    round: usize,
) -> anyhow::Result<Boot> {
    let stack = ctx.stack;
    let broker = stack.broker_pid;
    procfs::settle(broker, Duration::from_secs(30)).await;
    let started = Instant::now();
    let gw = stack.gateway(vh, &[("PING_INTERVAL_MS", "600000")]).await?;
    let ready_s = started.elapsed().as_secs_f64();
    let replayed = revocations::gateway_count(gw.addr).await?;
    anyhow::ensure!(
        replayed == expect as u64,
        "the gateway replayed {replayed} revocations, not the {expect} in the stream"
    );
    let (rss_ready, _) = steady_rss_kib(gw.pid, 0.0, Duration::from_secs(5)).await;
    let cpu0 = cpu_secs(gw.pid);
    let shares = CpuShares::start(vec![("broker", vec![broker]), ("gateway", vec![gw.pid])]);
    let held = Held::open(
        ctx,
        gateway_target(vec![gw.addr]),
        n,
        &format!("gateway, {stream} stream"),
    )
    .await?;
    let cpus = procfs::Machine::describe(0).cpus;
    let (limit, cores) = shares.describe(cpus);
    let cpu_us = (cpu_secs(gw.pid) - cpu0) * 1e6 / held.ok.max(1) as f64;
    let (rss_after, rss_steady) = steady_rss_kib(gw.pid, 0.0, Duration::from_secs(10)).await;
    let boot = Boot {
        stream,
        round,
        ready_s,
        replayed,
        rss_ready_kib: rss_ready,
        rss_after_kib: rss_after,
        rss_steady,
        open: held.ok,
        failed: held.failed,
        first_error: held.first_error.clone(),
        connect_rate: held.rate(),
        rss_per_device_kib: rss_after.saturating_sub(rss_ready) as f64 / held.ok.max(1) as f64,
        gateway_cpu_us_per_connect: cpu_us,
        cores,
        limit,
        offsets: held.offsets(),
    };
    held.close().await;
    gw.stop().await;
    ctx.say(format!(
        "registry round {round}, {stream} stream: ready in {:.2} s with {replayed} revocations; {} devices ({} refused) at {:.0}/s; RSS {rss_ready} -> {rss_after} KiB, {:.2} KiB per device{}",
        boot.ready_s,
        boot.open,
        boot.failed,
        boot.connect_rate,
        boot.rss_per_device_kib,
        if rss_steady { "" } else { " (not steady)" }
    ));
    Ok(boot)
}
