//! JUnit XML, the format every CI system reads: one `<testsuite>` per suite file, one
//! `<testcase>` per check (classname = case, name = check), the numbers in the failure message.

use std::path::Path;
use std::time::Duration;

use quick_junit::{NonSuccessKind, Report, TestCase, TestCaseStatus, TestSuite};

use crate::error::{Error, Result};
use crate::harness::{Status, SuiteOutcome};

pub fn to_junit(outcome: &SuiteOutcome) -> Result<String> {
    let mut report = Report::new("loragate");
    let mut ts = TestSuite::new(outcome.suite.clone());
    ts.add_property(("suite_file", outcome.file.display().to_string().as_str()));
    ts.add_property(("scorer", outcome.scorer.as_str()));
    if let Some(s) = &outcome.identity_scorer {
        ts.add_property(("identity_scorer", s.as_str()));
    }
    if let Some(s) = &outcome.aesthetic_scorer {
        ts.add_property(("aesthetic_scorer", s.as_str()));
    }
    ts.add_property(("clip_scale", outcome.scale.describe()));
    ts.add_property(("device", format!("{}-{}", outcome.device, outcome.dtype).as_str()));
    let t = &outcome.timings;
    ts.set_time(Duration::from_secs_f64(t.plan + t.generate + t.score + t.checks + t.baselines));
    for r in &outcome.results {
        let status = match r.status {
            Status::Passed => TestCaseStatus::success(),
            Status::Skipped => {
                let mut s = TestCaseStatus::skipped();
                s.set_message(r.message.clone());
                s
            }
            // As pytest reports an xfail: skipped, with the reason.
            Status::Known => {
                let mut s = TestCaseStatus::skipped();
                s.set_message(r.message.clone());
                s.set_type("loragate.known-failure");
                s
            }
            // Not a failure, but not silently green either: CI shows skipped tests apart.
            Status::Review => {
                let mut s = TestCaseStatus::skipped();
                s.set_message(format!("to review: {}", r.message));
                s.set_type("loragate.review");
                s
            }
            Status::Failed | Status::Error => {
                let kind = if r.status == Status::Failed { NonSuccessKind::Failure } else { NonSuccessKind::Error };
                let mut s = TestCaseStatus::non_success(kind);
                s.set_message(r.message.clone());
                s.set_type(format!("loragate.{}", r.check.split(['/', '@']).next().unwrap_or("check")));
                s
            }
        };
        let mut tc = TestCase::new(r.check.clone(), status);
        tc.set_classname(format!("{}.{}", outcome.suite, r.case));
        // Metrics go to system-out: the JUnit schema CI systems validate against has no
        // properties on test cases.
        let mut out = if r.status == Status::Passed { r.message.clone() } else { String::new() };
        if !r.scorer.is_empty() {
            if !out.is_empty() {
                out.push('\n');
            }
            out.push_str(&format!("scorer={}", r.scorer));
        }
        if !r.metrics.is_empty() {
            let m: Vec<String> = r.metrics.iter().map(|(k, v)| format!("{k}={v:.6}")).collect();
            if !out.is_empty() {
                out.push('\n');
            }
            out.push_str(&m.join(" "));
        }
        if !out.is_empty() {
            tc.set_system_out(out);
        }
        ts.add_test_case(tc);
    }
    report.add_test_suite(ts);
    report.to_string().map_err(|e| Error::invalid(format!("writing JUnit XML: {e}")))
}

/// Merges JUnit files (one per partition of a matrix run) into one report.
pub fn merge(files: &[&Path]) -> Result<String> {
    let mut merged = Report::new("loragate");
    for f in files {
        let text = std::fs::read_to_string(f).map_err(|e| Error::io(f, e))?;
        let report = Report::deserialize_from_str(&text)
            .map_err(|e| Error::invalid(format!("{}: not a JUnit XML file: {e}", f.display())))?;
        merged.add_test_suites(report.test_suites);
    }
    merged.to_string().map_err(|e| Error::invalid(format!("writing JUnit XML: {e}")))
}
