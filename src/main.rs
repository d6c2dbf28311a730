//! The `loragate` command. All work happens in the library; this maps errors to exit codes.

fn main() -> std::process::ExitCode {
    match loragate::cli::run() {
        Ok(code) => std::process::ExitCode::from(code as u8),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::from(e.exit_code() as u8)
        }
    }
}
