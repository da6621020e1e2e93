//! `tartan-cni`: the CNI plugin (see the CNI issue).
fn main() -> std::process::ExitCode {
    eprintln!("tartan-cni: not built yet");
    std::process::ExitCode::FAILURE
}
