#[cfg(target_env = "musl")]
mod allocator;

#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOCATOR: allocator::Allocator = allocator::Allocator::new();

fn main() -> std::process::ExitCode {
    drainit::main()
}
