//! Removes leftovers of killed test runs (see `sockmesh_tests::cleanup::sweep_stale`).
//! Run before a test session; safe while other tests run, since it only touches resources
//! whose owning test process is gone.

fn main() -> anyhow::Result<()> {
    sockmesh_tests::require_root();
    let done = sockmesh_tests::cleanup::sweep_stale()?;
    for line in &done {
        println!("smt-sweep: {line}");
    }
    println!("smt-sweep: {} action(s)", done.len());
    Ok(())
}
