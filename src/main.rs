fn main() -> std::process::ExitCode {
    drainit::main()
}
