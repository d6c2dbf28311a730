use clap::Args;

use crate::error::{ExitCode, Result};

#[derive(Debug, Args)]
pub struct SchemaArgs {}

/// Prints the JSON Schema of suite files (for editor completion: point yaml-language-server at it).
pub fn run(_: SchemaArgs) -> Result<ExitCode> {
    println!("{}", schema_json());
    Ok(ExitCode::Success)
}

pub fn schema_json() -> String {
    let schema = schemars::schema_for!(crate::suite::raw::RawSuite);
    serde_json::to_string_pretty(&schema).expect("a schema serialises")
}
