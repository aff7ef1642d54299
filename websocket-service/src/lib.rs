//! websocket-service: the device-facing gateway. Built in its own issue.
