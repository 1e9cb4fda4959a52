//! The record of an upload, whichever API it came through: when it ends,
//! finished, failed or interrupted (its client stopped sending or went
//! away), one log line says who sent it (token name and role, client
//! address, `via` which API), how it ended and what it committed; each
//! overwritten file gets a line of its own; the audit counters count it and
//! its files; and the misses its committed files resolve are marked. Files
//! committed before an error stay stored, so they are recorded as any.

use probe_api::names::ProbePath;
use probe_api::v1::FileOutcome;
use tracing::{info, warn};

use crate::server::auth::Caller;
use crate::server::metrics::{AuditLabels, Metrics, OutcomeLabels};
use crate::server::upload_session::UploadEnd;
use crate::store::misses::Resolver;
use crate::store::misses::recorder::MissRecorder;

/// Who sent an upload, and through which API.
pub(crate) struct Uploader<'a> {
    pub caller: &'a Caller,
    /// The client's address.
    pub client: &'a str,
    /// "UploadProbes", or the product's route.
    pub via: &'a str,
}

/// Logs and audits the end of an upload, and marks the misses it resolved.
pub(crate) async fn record_upload_end(metrics: &Metrics, misses: &MissRecorder, who: &Uploader<'_>, end: &UploadEnd) {
    let Uploader { caller, client, via } = *who;
    let response = &end.response;
    let (stored, identical, conflicts, overwritten, bytes) = (
        response.stored_count,
        response.identical_count,
        response.conflict_count,
        response.overwritten_count,
        response.bytes_received,
    );
    let (token, role) = (&caller.name, &caller.role);
    let action = match &end.error {
        None => {
            info!(%token, %role, client, via, stored, identical, conflicts, overwritten, bytes, "upload finished");
            "upload"
        }
        Some(error) => {
            // What was committed before the error stays: the line says what.
            let (ending, action) = match end.interrupted() {
                true => ("upload interrupted", "upload_interrupted"),
                false => ("upload failed", "upload_failed"),
            };
            let code = error.code;
            info!(%token, %role, client, via, stored, identical, conflicts, overwritten, bytes, ?code, %error, "{ending}");
            action
        }
    };
    for result in &response.results {
        if result.outcome() == FileOutcome::Overwritten {
            info!(token = %caller.name, role = %caller.role, client, via, path = %result.path, "probe overwritten");
        }
    }
    let audit = |action| AuditLabels { token: caller.name.clone(), action };
    metrics.changes_by_token.get_or_create(&audit(action)).inc();
    if response.overwritten_count > 0 {
        metrics.changes_by_token.get_or_create(&audit("overwrite")).inc_by(u64::from(response.overwritten_count));
    }
    metrics.upload_bytes.inc_by(response.bytes_received);
    for (outcome, count) in [
        ("stored", response.stored_count),
        ("identical", response.identical_count),
        ("conflict", response.conflict_count),
        ("overwritten", response.overwritten_count),
    ] {
        let labels = OutcomeLabels { outcome };
        metrics.upload_files.get_or_create(&labels).inc_by(u64::from(count));
    }
    // Every path of the response is stored now, whatever its outcome.
    let paths: Vec<ProbePath> = response.results.iter().filter_map(|r| ProbePath::parse(&r.path).ok()).collect();
    if let Err(error) = misses.resolve(&paths, Resolver::Upload).await {
        warn!(%error, "could not mark misses resolved by an upload");
    }
}
