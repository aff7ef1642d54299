//! device-service: the Hive-facing relay and REST API. Built in its own issue.
