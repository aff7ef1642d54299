//! OpenAPI entries for the routes served without auth (`mosaic_runtime::health`
//! serves the first three, `api::router` the document itself). Never routed: they
//! only describe.

#![allow(dead_code)]

/// Whether the process is alive.
#[utoipa::path(get, path = "/healthz", responses((status = 200, description = "The process is alive")))]
pub(super) async fn healthz() {}

/// Whether the service is ready: connected to RabbitMQ and not shutting down.
#[utoipa::path(
    get,
    path = "/readyz",
    responses(
        (status = 200, description = "Connected to RabbitMQ, publishers not blocked"),
        (status = 503, description = "Not connected, blocked, or shutting down"),
    )
)]
pub(super) async fn readyz() {}

/// Prometheus metrics (text exposition format); docs/operations.md names each.
#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text", content_type = "text/plain")))]
pub(super) async fn metrics() {}

/// This document.
#[utoipa::path(get, path = "/openapi.json", responses((status = 200, description = "The OpenAPI document", content_type = "application/json")))]
pub(super) async fn openapi() {}
