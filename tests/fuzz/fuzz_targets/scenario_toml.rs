//! Scenario files: TOML parsing and every check behind `kiln scenario check` / `kiln run`.
#![no_main]

use kiln_scenario::{parse_scenario, SourceFile};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let source = SourceFile {
        path: "fuzz.toml".into(),
        text: text.to_owned(),
    };
    match parse_scenario(&source, None) {
        // What parsed must serialize and parse again to the same scenario.
        Ok((scenario, _)) => {
            let again = SourceFile {
                path: "again.toml".into(),
                text: scenario.to_toml(),
            };
            let reparsed = parse_scenario(&again, None);
            assert!(
                reparsed.is_ok(),
                "to_toml output does not parse: {reparsed:?}\n{}",
                again.text
            );
        }
        // Every error must render (positions inside the text).
        Err(errors) => {
            for e in errors {
                let _ = e.to_string();
            }
        }
    }
});
