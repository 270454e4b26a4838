fn main() {
    let a: Vec<String> = std::env::args().collect();
    let seed: u64 = a[1].parse().unwrap();
    let thread: usize = a[2].parse().unwrap();
    let n: usize = a[3].parse().unwrap();
    let alone = a[4] == "1";
    for (i, op) in hmm_tools::stress::plan(seed, thread, n, 128, alone, true).iter().enumerate() {
        println!("{i}: {op:?}");
    }
}
