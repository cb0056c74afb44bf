//! harness.log: a `tracing` layer that copies every event inside a `scenario` span (its `run`
//! field names the run) into that run's bundle, so each bundle has its own harness log even
//! with many scenarios running in parallel.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::SystemTime;

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

static SINKS: Mutex<Option<HashMap<String, File>>> = Mutex::new(None);

/// Removes the run's sink when dropped.
pub struct SinkGuard(String);

impl Drop for SinkGuard {
    fn drop(&mut self) {
        let mut sinks = SINKS.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(map) = sinks.as_mut() {
            map.remove(&self.0);
        }
    }
}

/// Sends events of run `run_id` to `path` until the guard is dropped.
pub fn register(run_id: &str, path: &Path) -> Option<SinkGuard> {
    let file = match File::create(path) {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!("cannot create {}: {e}", path.display());
            return None;
        }
    };
    let mut sinks = SINKS.lock().unwrap_or_else(|p| p.into_inner());
    sinks
        .get_or_insert_with(HashMap::new)
        .insert(run_id.to_string(), file);
    Some(SinkGuard(run_id.to_string()))
}

/// Writes a WARN line into run `run_id`'s harness.log directly, whatever subscriber is
/// installed (for notes the bundle must hold, such as fixtures that were not copied).
pub fn note(run_id: &str, text: &str) {
    let line = format!(
        "{} {:5} kiln_runner: {text}\n",
        humantime::format_rfc3339_millis(SystemTime::now()),
        "WARN"
    );
    let mut sinks = SINKS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(file) = sinks.as_mut().and_then(|m| m.get_mut(run_id)) {
        let _ = file.write_all(line.as_bytes());
    }
}

/// The layer; add it to the subscriber (the CLI does).
pub struct RunLogLayer;

struct RunTag(String);

#[derive(Default)]
struct Fields {
    run: Option<String>,
    text: String,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.record_debug(field, &value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "run" => self.run = Some(format!("{value:?}").trim_matches('"').to_string()),
            "message" => {
                let _ = write!(self.text, "{value:?}");
            }
            name => {
                let _ = write!(self.text, " {name}={value:?}");
            }
        }
    }
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for RunLogLayer {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        if attrs.metadata().name() != "scenario" {
            return;
        }
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        if let (Some(run), Some(span)) = (fields.run, ctx.span(id)) {
            span.extensions_mut().insert(RunTag(run));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let Some(scope) = ctx.event_scope(event) else {
            return;
        };
        let Some(run) = scope
            .from_root()
            .find_map(|span| span.extensions().get::<RunTag>().map(|t| t.0.clone()))
        else {
            return;
        };
        let mut fields = Fields::default();
        event.record(&mut fields);
        let line = format!(
            "{} {:5} {}: {}\n",
            humantime::format_rfc3339_millis(SystemTime::now()),
            event.metadata().level(),
            event.metadata().target(),
            fields.text.trim_start()
        );
        let mut sinks = SINKS.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(file) = sinks.as_mut().and_then(|m| m.get_mut(&run)) {
            let _ = file.write_all(line.as_bytes());
        }
    }
}
