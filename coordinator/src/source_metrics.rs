//! Per-source metrics of the leader's CDC sources, read at scrape time (the sources hold
//! their own counters; this module only exports them).

/// Per-source gauges read at scrape time from the running term's sources: WAL lag (bytes
/// and ms), state, snapshot rows copied, transactions streamed. A follower reports none.
pub struct SourcesCollector(pub std::sync::Arc<crate::node::Node>);

impl std::fmt::Debug for SourcesCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SourcesCollector")
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct SourceLabel {
    source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct SourceStateLabel {
    source: String,
    state: String,
}

impl prometheus_client::collector::Collector for SourcesCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::MetricType;
        use prometheus_client::metrics::gauge::ConstGauge;
        let Ok(c) = self.0.coordinator() else {
            return Ok(());
        };
        let sources = c.sources();
        let gauges: [(&str, &str, fn(&freshet_proto::admin::v1::SourceInfo) -> i64); 4] = [
            (
                "freshet_source_lag_bytes",
                "WAL bytes between the server's position and the source's confirmed one",
                |s| s.lag_bytes as i64,
            ),
            (
                "freshet_source_lag_milliseconds",
                "How far behind the source's confirmed position is, in time",
                |s| s.lag_ms as i64,
            ),
            (
                "freshet_source_snapshot_rows",
                "Rows copied by the source's table snapshots",
                |s| s.snapshot_rows as i64,
            ),
            (
                "freshet_source_transactions",
                "Transactions the source has streamed",
                |s| s.transactions as i64,
            ),
        ];
        for (name, help, value) in gauges {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for s in &sources {
                let label = SourceLabel {
                    source: s.name.clone(),
                };
                ConstGauge::new(value(s)).encode(family.encode_family(&label)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "freshet_source_state",
            "1 for the source's current state (starting, snapshotting, streaming, error)",
            None,
            MetricType::Gauge,
        )?;
        for s in &sources {
            let label = SourceStateLabel {
                source: s.name.clone(),
                state: s.state.clone(),
            };
            ConstGauge::new(1i64).encode(family.encode_family(&label)?)?;
        }
        Ok(())
    }
}
