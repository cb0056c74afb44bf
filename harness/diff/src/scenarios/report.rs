//! `kiln diff run`'s report: one line per scenario, the facts that are not identical under it,
//! a summary; or the same as one JSON document.

use serde_json::{json, Value};

use super::{Fact, FactVerdict};

/// What became of one scenario.
#[derive(Debug, Clone)]
pub enum ScenarioDiff {
    /// Both backends ran it; the facts compared.
    Compared(Vec<Fact>),
    /// It could not be compared; says why (e.g. "runs on one backend only").
    Inconclusive(String),
}

/// The overall judgement of a scenario or a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Overall {
    /// Every fact identical.
    Identical,
    /// Some facts differ, each allowed by a rule.
    Tolerated,
    /// Something could not be compared.
    Inconclusive,
    /// Some fact differs unexplained.
    Divergent,
}

impl Overall {
    fn as_str(self) -> &'static str {
        match self {
            Overall::Identical => "identical",
            Overall::Tolerated => "tolerated",
            Overall::Inconclusive => "inconclusive",
            Overall::Divergent => "divergent",
        }
    }
}

impl ScenarioDiff {
    /// The scenario's judgement: its worst fact.
    pub fn overall(&self) -> Overall {
        match self {
            ScenarioDiff::Inconclusive(_) => Overall::Inconclusive,
            ScenarioDiff::Compared(facts) => facts
                .iter()
                .map(|f| match f.verdict {
                    FactVerdict::Identical => Overall::Identical,
                    FactVerdict::Tolerated { .. } => Overall::Tolerated,
                    FactVerdict::Inconclusive(_) => Overall::Inconclusive,
                    FactVerdict::Divergent => Overall::Divergent,
                })
                .max()
                .unwrap_or(Overall::Identical),
        }
    }
}

/// Everything one `kiln diff run` found.
#[derive(Debug, Clone)]
pub struct RunDiffReport {
    /// The two sides' names, in comparison order.
    pub labels: (String, String),
    /// Each scenario, in corpus order.
    pub scenarios: Vec<(String, ScenarioDiff)>,
}

impl RunDiffReport {
    /// How many scenarios ended as `o`.
    pub fn count(&self, o: Overall) -> usize {
        self.scenarios
            .iter()
            .filter(|(_, d)| d.overall() == o)
            .count()
    }

    /// Whether any scenario is DIVERGENT (the command line's exit code says so).
    pub fn has_divergent(&self) -> bool {
        self.count(Overall::Divergent) > 0
    }

    /// The human report.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        for (id, d) in &self.scenarios {
            match d {
                ScenarioDiff::Inconclusive(why) => s += &format!("{id}: inconclusive ({why})\n"),
                ScenarioDiff::Compared(facts) => {
                    let overall = d.overall();
                    let word = match overall {
                        Overall::Divergent => "DIVERGENT",
                        o => o.as_str(),
                    };
                    s += &format!("{id}: {word} ({} facts)\n", facts.len());
                    for f in facts {
                        s += &fact_text(f);
                    }
                }
            }
        }
        s += &format!(
            "kiln diff run ({} vs {}): {} identical, {} tolerated, {} inconclusive, {} DIVERGENT\n",
            self.labels.0,
            self.labels.1,
            self.count(Overall::Identical),
            self.count(Overall::Tolerated),
            self.count(Overall::Inconclusive),
            self.count(Overall::Divergent)
        );
        s
    }

    /// The `--json` report, with the command's `exit_code`.
    pub fn to_json(&self, exit_code: i32) -> Value {
        json!({
            "backends": [self.labels.0, self.labels.1],
            "summary": {
                "identical": self.count(Overall::Identical),
                "tolerated": self.count(Overall::Tolerated),
                "inconclusive": self.count(Overall::Inconclusive),
                "divergent": self.count(Overall::Divergent),
            },
            "scenarios": self.scenarios.iter().map(|(id, d)| {
                let (facts, reason) = match d {
                    ScenarioDiff::Inconclusive(why) => (Vec::new(), Some(why.clone())),
                    ScenarioDiff::Compared(facts) => (facts.iter().map(fact_json).collect(), None),
                };
                json!({"id": id, "verdict": d.overall().as_str(), "reason": reason, "facts": facts})
            }).collect::<Vec<_>>(),
            "exit_code": exit_code,
        })
    }
}

fn fact_text(f: &Fact) -> String {
    match &f.verdict {
        FactVerdict::Identical => String::new(),
        FactVerdict::Tolerated { rule, reason } => {
            format!("  tolerated    {} ({rule}: {reason})\n", f.name)
        }
        FactVerdict::Inconclusive(why) => format!("  inconclusive {} ({why})\n", f.name),
        FactVerdict::Divergent => format!(
            "  DIVERGENT    {}\n{}",
            f.name,
            f.diff.as_deref().unwrap_or("")
        ),
    }
}

fn fact_json(f: &Fact) -> Value {
    let (verdict, rule, reason) = match &f.verdict {
        FactVerdict::Identical => ("identical", None, None),
        FactVerdict::Tolerated { rule, reason } => {
            ("tolerated", Some(rule.clone()), Some(reason.clone()))
        }
        FactVerdict::Inconclusive(why) => ("inconclusive", None, Some(why.clone())),
        FactVerdict::Divergent => ("divergent", None, None),
    };
    json!({"fact": f.name, "verdict": verdict, "rule": rule, "reason": reason, "diff": f.diff})
}
