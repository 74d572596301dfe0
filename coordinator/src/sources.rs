//! Change-data-capture sources run by a term: starting the configured and catalogued
//! sources (with the term's coordinator as their [`ChangeSink`], see `sink`), and adding
//! one at run time. The traits a source implementation fills live in
//! `freshet_common::sink` and are re-exported here.

use std::sync::Arc;
use std::time::Duration;

use freshet_common::error::{Error, Result};
use freshet_common::sink::ChangeSink;
pub use freshet_common::sink::{Source, SourceFactory};
pub use freshet_common::source::SourceOrigin;
use freshet_common::source::{SourceConfig, SourceInfoExt};

use crate::Coordinator;

pub(crate) struct RunningSource {
    pub(crate) def: SourceConfig,
    pub(crate) origin: SourceOrigin,
    pub(crate) source: Arc<dyn Source>,
}

impl RunningSource {
    /// Its state, with where its definition comes from.
    fn info(&self) -> freshet_proto::admin::v1::SourceInfo {
        let mut info = self.source.info();
        info.set_source_origin(self.origin);
        info
    }
}

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
