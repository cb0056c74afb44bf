//! JUnit XML through quick-junit: one test suite, one test case per scenario, failures carrying
//! the class as type, the message, and the console tail as description; retries as reruns.

use quick_junit::{NonSuccessKind, Report, TestCase, TestCaseStatus, TestRerun, TestSuite};

use crate::{RunResult, RunSummary};

fn console_tail(r: &RunResult) -> String {
    let mut text = String::new();
    if let Some(f) = &r.failure {
        text += &format!("{}: {}\n", f.class.as_str(), f.message);
    }
    if !r.console_tail.is_empty() {
        text += "--- console tail ---\n";
        text += &r.console_tail.join("\n");
        text.push('\n');
    }
    text
}

/// Builds the report.
pub fn report(summary: &RunSummary) -> Report {
    let mut suite = TestSuite::new("kiln");
    if let Some(env) = &summary.environment {
        for field in crate::environment::FIELDS {
            if let Some(value) = env.field(field).flatten() {
                suite.add_property((format!("environment.{field}"), value.to_string()));
            }
        }
    }
    for o in &summary.outcomes {
        let r = &o.result;
        let mut status = if r.passed() {
            TestCaseStatus::success()
        } else {
            let mut s = TestCaseStatus::non_success(NonSuccessKind::Failure);
            if let Some(f) = &r.failure {
                s.set_type(f.class.as_str());
                s.set_message(f.message.clone());
            }
            s.set_description(console_tail(r));
            s
        };
        for earlier in &o.retries {
            let mut rerun = TestRerun::new(NonSuccessKind::Failure);
            if let Some(f) = &earlier.failure {
                rerun.set_type(f.class.as_str());
                rerun.set_message(f.message.clone());
            }
            rerun.set_description(console_tail(earlier));
            status.add_rerun(rerun);
        }
        let mut case = TestCase::new(r.scenario.clone(), status);
        case.set_classname("kiln.scenario");
        case.set_time(std::time::Duration::from_secs_f64(
            r.phases.total_ms / 1000.0,
        ));
        suite.add_test_case(case);
    }
    for id in &summary.not_run {
        suite.add_test_case(TestCase::new(id.clone(), TestCaseStatus::skipped()));
    }
    let mut report = Report::new("kiln");
    report.set_time(summary.elapsed);
    report.add_test_suite(suite);
    report
}

/// The report as XML.
pub fn to_xml(summary: &RunSummary) -> Result<String, quick_junit::SerializeError> {
    report(summary).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{artifacts, ScenarioOutcome, Verdict};
    use std::time::Duration;

    fn result(id: &str, failure: Option<artifacts::Failure>) -> RunResult {
        RunResult {
            scenario: id.into(),
            run_id: "r".into(),
            attempt: 1,
            verdict: if failure.is_some() {
                Verdict::Fail
            } else {
                Verdict::Pass
            },
            failure,
            started_at: String::new(),
            ready: Vec::new(),
            steps: Vec::new(),
            expectations: Vec::new(),
            phases: artifacts::Phases {
                total_ms: 1500.0,
                ..Default::default()
            },
            provenance: Default::default(),
            environment: None,
            bundle: None,
            snapshot: None,
            console_tail: vec![
                "[ 0.1] booting".into(),
                "Kernel panic - not syncing: oops".into(),
            ],
        }
    }

    #[test]
    fn junit_parses_back_with_classes_and_console_tail() {
        let failure = artifacts::Failure {
            class: artifacts::FailureClass::GuestPanic,
            message: "guest kernel panic: Kernel panic - not syncing: oops".into(),
            step: None,
        };
        let summary = RunSummary {
            outcomes: vec![
                ScenarioOutcome {
                    result: result("good", None),
                    retries: vec![],
                },
                ScenarioOutcome {
                    result: result("bad", Some(failure)),
                    retries: vec![],
                },
            ],
            not_run: vec!["later".into()],
            cancelled: false,
            elapsed: Duration::from_secs(3),
            environment: Some(crate::Environment {
                host: crate::environment::Host {
                    kvm_kind: "pvm".into(),
                    ..Default::default()
                },
                ..Default::default()
            }),
        };
        let xml = to_xml(&summary).expect("xml");
        let back = Report::deserialize_from_str(&xml).expect("parses");
        let suite = &back.test_suites[0];
        assert_eq!((suite.tests, suite.failures), (3, 1));
        let kvm = suite
            .properties
            .iter()
            .find(|p| p.name.as_str() == "environment.host.kvm_kind")
            .expect("environment property");
        assert_eq!(kvm.value.as_str(), "pvm");
        let bad = suite
            .test_cases
            .iter()
            .find(|c| c.name.as_str() == "bad")
            .expect("bad");
        let TestCaseStatus::NonSuccess {
            ty, description, ..
        } = &bad.status
        else {
            panic!("bad is a failure")
        };
        assert_eq!(ty.as_ref().map(|t| t.as_str()), Some("guest-panic"));
        assert!(description
            .as_ref()
            .is_some_and(|d| d.as_str().contains("--- console tail ---\n[ 0.1] booting")));
    }
}
