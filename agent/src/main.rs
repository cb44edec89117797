fn main() -> std::process::ExitCode {
    sockmesh::main()
}
