//! Validation of JUnit XML against the rules of the schema CI systems read (Jenkins'
//! `junit-10.xsd`, which GitHub test reporters and GitLab follow): element nesting, required
//! attributes, numeric attributes, and counts that agree with the test cases.
//!
//! Written as code rather than an XSD run through libxml2 so the test needs nothing installed.

use std::collections::HashMap;

use quick_xml::Reader;
use quick_xml::events::Event;

#[derive(Debug, Default)]
struct Suite {
    attrs: HashMap<String, String>,
    tests: usize,
    failures: usize,
    errors: usize,
    skipped: usize,
}

fn attrs(e: &quick_xml::events::BytesStart) -> HashMap<String, String> {
    e.attributes()
        .filter_map(|a| a.ok())
        .map(|a| {
            (
                String::from_utf8_lossy(a.key.as_ref()).into_owned(),
                a.normalized_value(quick_xml::XmlVersion::Implicit1_0).map(|v| v.into_owned()).unwrap_or_default(),
            )
        })
        .collect()
}

fn allowed_children(parent: &str) -> &'static [&'static str] {
    match parent {
        "" => &["testsuites", "testsuite"],
        "testsuites" => &["testsuite"],
        "testsuite" => &["properties", "testcase", "system-out", "system-err"],
        "properties" => &["property"],
        "testcase" => &["skipped", "error", "failure", "system-out", "system-err"],
        _ => &[],
    }
}

fn required(element: &str) -> &'static [&'static str] {
    match element {
        "testsuite" => &["name", "tests"],
        "property" => &["name", "value"],
        "testcase" => &["name"],
        _ => &[],
    }
}

fn numeric(attr: &str) -> bool {
    matches!(attr, "tests" | "failures" | "errors" | "skipped" | "disabled" | "time" | "assertions")
}

/// Returns the list of schema violations (empty when the document is valid).
pub fn validate(xml: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let mut reader = Reader::from_str(xml);
    let mut stack: Vec<String> = Vec::new();
    let mut suites: Vec<Suite> = Vec::new();
    let mut root_seen = false;
    loop {
        let ev = match reader.read_event() {
            Ok(e) => e,
            Err(e) => {
                problems.push(format!("not well-formed XML: {e}"));
                break;
            }
        };
        let (start, empty) = match &ev {
            Event::Start(e) => (Some(e.clone()), false),
            Event::Empty(e) => (Some(e.clone()), true),
            _ => (None, false),
        };
        if let Some(e) = start {
            let name = String::from_utf8_lossy(e.name().as_ref()).into_owned();
            let parent = stack.last().map(String::as_str).unwrap_or("");
            if parent.is_empty() {
                if root_seen {
                    problems.push("more than one root element".into());
                }
                root_seen = true;
            }
            if !allowed_children(parent).contains(&name.as_str()) {
                problems.push(format!("<{name}> is not allowed inside <{}>", if parent.is_empty() { "document" } else { parent }));
            }
            let a = attrs(&e);
            for req in required(&name) {
                if !a.contains_key(*req) {
                    problems.push(format!("<{name}> lacks the required attribute `{req}`"));
                }
            }
            for (k, v) in &a {
                if numeric(k) && v.parse::<f64>().map(|x| !(x.is_finite() && x >= 0.0)).unwrap_or(true) {
                    problems.push(format!("<{name} {k}=\"{v}\"> is not a non-negative number"));
                }
            }
            match name.as_str() {
                "testsuite" => suites.push(Suite { attrs: a, ..Default::default() }),
                "testcase" => {
                    if let Some(s) = suites.last_mut() {
                        s.tests += 1;
                    }
                }
                "failure" | "error" | "skipped" => {
                    if let Some(s) = suites.last_mut() {
                        match name.as_str() {
                            "failure" => s.failures += 1,
                            "error" => s.errors += 1,
                            _ => s.skipped += 1,
                        }
                    }
                }
                _ => {}
            }
            if !empty {
                stack.push(name);
            }
        }
        match ev {
            Event::End(_) => {
                stack.pop();
            }
            Event::Eof => break,
            _ => {}
        }
    }
    if !root_seen {
        problems.push("no root element".into());
    }
    for s in &suites {
        let name = s.attrs.get("name").cloned().unwrap_or_default();
        for (attr, count) in [("tests", s.tests), ("failures", s.failures), ("errors", s.errors), ("skipped", s.skipped)] {
            if let Some(v) = s.attrs.get(attr)
                && v.parse::<usize>().ok() != Some(count) {
                    problems.push(format!("testsuite {name}: {attr}=\"{v}\" but it has {count}"));
                }
        }
    }
    problems
}
