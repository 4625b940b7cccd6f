//! Gateway counters, resolved once so the hot path does no registry lookups.

use metrics::{Counter, Gauge, counter, gauge};

pub(crate) struct Metrics {
    pub(crate) connections_open: Gauge,
    pub(crate) frames_in: Counter,
    pub(crate) frames_out: Counter,
}

impl Metrics {
    pub(crate) fn new() -> Self {
        Self {
            connections_open: gauge!("pigeon_connections_open"),
            frames_in: counter!("pigeon_frames_in_total"),
            frames_out: counter!("pigeon_frames_out_total"),
        }
    }
}
