//! Change-data-capture sources run by a term: starting the configured and catalogued
//! sources (with the term's coordinator as their [`ChangeSink`], see `sink`), and adding
//! one at run time. The traits a source implementation fills live in
//! `freshet_common::sink` and are re-exported here.

use std::sync::Arc;
use std::time::Duration;

use freshet_common::error::{Error, Result};
use freshet_common::sink::ChangeSink;
pub use freshet_common::sink::{Source, SourceFactory};
use freshet_common::source::SourceConfig;
pub use freshet_common::source::SourceOrigin;

use crate::Coordinator;
use crate::term::RunningSource;

impl Coordinator {
    /// Starts the sources of the configuration file and of the catalog (called once a
    /// term's coordinator is up; sources run on the leader only).
    pub async fn start_sources(self: &Arc<Self>) -> Result<()> {
        let Some(factory) = self.inner.factory.clone() else {
            return Ok(());
        };
        let mut defs: Vec<(SourceConfig, SourceOrigin)> = self
            .inner
            .ctx
            .config
            .sources
            .iter()
            .map(|s| (s.clone(), SourceOrigin::Config))
            .collect();
        // The configuration file's sources start even when the catalog cannot be read.
        let mut catalog_error = None;
        let mut catalogued = Vec::new();
        if let Some(cat) = &self.inner.catalog {
            let mut wait = Duration::from_millis(200);
            for attempt in 1..=5 {
                match cat.load_sources().await {
                    Ok(s) => {
                        catalogued = s;
                        catalog_error = None;
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(attempt, error = %e, "catalog sources not readable; retrying");
                        catalog_error = Some(e);
                        tokio::time::sleep(wait).await;
                        wait *= 2;
                    }
                }
            }
        }
        {
            for s in catalogued {
                if defs.iter().any(|(d, _)| d.name == s.name) {
                    tracing::warn!(source = %s.name, "a source of the configuration file has this name; the catalog's definition is ignored");
                    continue;
                }
                defs.push((s, SourceOrigin::Catalog));
            }
        }
        for (def, origin) in defs {
            let allowed = match origin {
                SourceOrigin::Config => freshet_common::secrets::Origin::ConfigFile,
                SourceOrigin::Catalog => freshet_common::secrets::Origin::RunTime,
            };
            let bound = match freshet_common::secrets::bind(
                &def,
                &self.inner.ctx.config.secrets,
                allowed,
            ) {
                Ok(b) => b,
                Err(e) => {
                    // A catalogued source whose credential is no longer allowed stays off.
                    tracing::error!(source = %def.name, error = %e, "source not started");
                    continue;
                }
            };
            tracing::info!(source = %def.name, ?origin, "starting source");
            let source = factory.start(self.clone() as Arc<dyn ChangeSink>, bound);
            self.register_source(def, origin, source);
        }
        match catalog_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Adds a source at run time, or replaces a run-time source of the same name (say, with
    /// one more table: the added table is copied on its own, the others stream on). The
    /// definition is checked against its database and recorded in the catalog before it
    /// starts; when anything is wrong, nothing changes.
    pub async fn define_source(
        self: &Arc<Self>,
        def: SourceConfig,
    ) -> Result<freshet_proto::admin::v1::SourceInfo> {
        let invalid = |message: String| Error::InvalidSource {
            name: def.name.clone(),
            message,
        };
        let factory = self
            .inner
            .factory
            .clone()
            .ok_or_else(|| invalid("this coordinator runs no sources".into()))?;
        let Some(catalog) = &self.inner.catalog else {
            return Err(invalid(
                "sources added at run time are recorded in the catalog: set catalog.uri".into(),
            ));
        };
        def.validate().map_err(invalid)?;
        for t in &def.tables {
            let allowed = &self.inner.ctx.config.storage.allowed_prefixes;
            freshet_common::prefixes::check_uri(allowed, &t.name, &t.uri)?;
        }
        if self
            .inner
            .ctx
            .config
            .sources
            .iter()
            .any(|s| s.name == def.name)
        {
            return Err(invalid(
                "defined in the configuration file; change it there".into(),
            ));
        }
        {
            let running = self.inner.sources.lock().expect("lock");
            for r in running.iter().filter(|r| r.def.name != def.name) {
                for t in &def.tables {
                    if r.def.tables.iter().any(|o| o.name == t.name) {
                        return Err(invalid(format!(
                            "table '{}' is already fed by source '{}'",
                            t.name, r.def.name
                        )));
                    }
                }
                if r.def.slot == def.slot {
                    return Err(invalid(format!(
                        "slot '{}' is already used by source '{}'",
                        def.slot, r.def.name
                    )));
                }
            }
        }
        // Credentials only from the coordinator's allowlist, checked before any connection.
        let bound = freshet_common::secrets::bind(
            &def,
            &self.inner.ctx.config.secrets,
            freshet_common::secrets::Origin::RunTime,
        )?;
        factory.check(&bound).await.map_err(invalid)?;
        catalog.save_source(&def).await?;
        let old = {
            let mut running = self.inner.sources.lock().expect("lock");
            running
                .iter()
                .position(|r| r.def.name == def.name)
                .map(|i| running.remove(i))
        };
        if let Some(old) = old {
            tracing::info!(source = %def.name, "replacing source");
            old.source.stop();
            if tokio::time::timeout(Duration::from_secs(60), old.source.stopped())
                .await
                .is_err()
            {
                tracing::warn!(source = %def.name, "the replaced source did not stop within 60 s");
            }
        }
        let source = factory.start(self.clone() as Arc<dyn ChangeSink>, bound);
        Ok(self.register_source(def, SourceOrigin::Catalog, source))
    }

    fn register_source(
        &self,
        def: SourceConfig,
        origin: SourceOrigin,
        source: Arc<dyn Source>,
    ) -> freshet_proto::admin::v1::SourceInfo {
        let running = RunningSource {
            def,
            origin,
            source,
        };
        let info = running.info();
        self.inner.sources.lock().expect("lock").push(running);
        info
    }

    /// Removes a source added at run time: stops it, releases what it holds in its
    /// database (its replication slot; its publication unless `keep_publication`) and
    /// forgets it (catalog). The tables it fed stay served (drop them on their own).
    pub async fn remove_source(&self, name: &str, keep_publication: bool) -> Result<()> {
        let invalid = |message: String| Error::InvalidSource {
            name: name.to_string(),
            message,
        };
        if self.inner.ctx.config.sources.iter().any(|s| s.name == name) {
            return Err(invalid(
                "defined in the configuration file; remove it there".into(),
            ));
        }
        let factory = self
            .inner
            .factory
            .clone()
            .ok_or_else(|| invalid("this coordinator runs no sources".into()))?;
        let Some(catalog) = &self.inner.catalog else {
            return Err(invalid(
                "run-time sources live in the catalog: set catalog.uri".into(),
            ));
        };
        let running = {
            let mut running = self.inner.sources.lock().expect("lock");
            let i = running
                .iter()
                .position(|r| r.def.name == name)
                .ok_or_else(|| Error::SourceNotFound(name.to_string()))?;
            running.remove(i)
        };
        self.inner.ctx.fence.check().await?;
        running.source.stop();
        if tokio::time::timeout(Duration::from_secs(60), running.source.stopped())
            .await
            .is_err()
        {
            tracing::warn!(source = %name, "the removed source did not stop within 60 s");
        }
        let bound = freshet_common::secrets::bind(
            &running.def,
            &self.inner.ctx.config.secrets,
            freshet_common::secrets::Origin::RunTime,
        )?;
        // Forgotten first: should releasing fail, no later leader restarts the source (and
        // re-creates the slot); the error says what to drop by hand.
        catalog.remove_source(name).await?;
        factory
            .release(&bound, keep_publication)
            .await
            .map_err(|m| invalid(format!("stopped and forgotten, but not released: {m}")))?;
        tracing::info!(source = %name, keep_publication, "source removed");
        Ok(())
    }

    /// Copies a source's table again from scratch and streams on (after an incompatible
    /// schema change paused it): the source stops, the table's Delta table (data, log,
    /// staged changes, snapshot marker) is deleted, and the source starts again; finding
    /// no marker, it copies that table on its own under its current shape while its other
    /// tables stream on. Readers see the table's history start again.
    pub async fn resync_table(self: &Arc<Self>, table: &str) -> Result<String> {
        let running = {
            let mut running = self.inner.sources.lock().expect("lock");
            let i = running
                .iter()
                .position(|r| r.def.tables.iter().any(|t| t.name == table))
                .ok_or_else(|| Error::InvalidTable {
                    table: table.to_string(),
                    message: "no source feeds it: only a source's tables can be copied again"
                        .into(),
                })?;
            running.remove(i)
        };
        let factory = self
            .inner
            .factory
            .clone()
            .ok_or_else(|| Error::Internal("a running source without a factory".into()))?;
        let name = running.def.name.clone();
        running.source.stop();
        if tokio::time::timeout(Duration::from_secs(60), running.source.stopped())
            .await
            .is_err()
        {
            tracing::warn!(source = %name, "the source did not stop within 60 s");
        }
        let result = async {
            if let Ok(t) = self.table(table) {
                let _delta = t.delta.lock().await;
                self.forget_table(&t, true).await?;
            }
            let allowed = match running.origin {
                SourceOrigin::Config => freshet_common::secrets::Origin::ConfigFile,
                _ => freshet_common::secrets::Origin::RunTime,
            };
            freshet_common::secrets::bind(&running.def, &self.inner.ctx.config.secrets, allowed)
        }
        .await;
        // The source runs again whatever happened (it would pause the table again if the
        // table could not be deleted).
        let bound = match result {
            Ok(b) => b,
            Err(e) => {
                self.inner.sources.lock().expect("lock").push(running);
                return Err(e);
            }
        };
        let source = factory.start(self.clone() as Arc<dyn ChangeSink>, bound);
        self.register_source(running.def, running.origin, source);
        tracing::info!(source = %name, table, "table copied again from the source");
        Ok(name)
    }

    /// The running sources.
    pub fn sources(&self) -> Vec<freshet_proto::admin::v1::SourceInfo> {
        self.inner
            .sources
            .lock()
            .expect("lock")
            .iter()
            .map(RunningSource::info)
            .collect()
    }
}
