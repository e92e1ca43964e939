//! The deterministic cluster simulation: real Raft members and stores, a
//! seeded hostile network, invariants after every step, and a
//! linearizability check of what the clients saw. A failing seed replays
//! exactly: `NEMBO_SIM_SEEDS=<seed> cargo test -p nembo-tests --test sim`.

use nembo_tests::sim::{Faults, Sim};

/// Seeds to run: `NEMBO_SIM_SEEDS` (comma-separated) or a fixed default set.
fn seeds(default: &[u64]) -> Vec<u64> {
    match std::env::var("NEMBO_SIM_SEEDS") {
        Ok(s) => s
            .split(',')
            .map(|x| x.trim().parse().expect("NEMBO_SIM_SEEDS: numbers"))
            .collect(),
        Err(_) => default.to_vec(),
    }
}

const HOSTILE: Faults = Faults {
    drop: 10,
    duplicate: 3,
    crash: 3,
    partition: 4,
};

#[test]
fn crashes_partitions_and_a_lossy_network_lose_no_acknowledged_write() {
    for seed in seeds(&[1, 2, 3, 4]) {
        let mut sim = Sim::new(seed, 3, 4, 40);
        for _ in 0..20_000 {
            sim.step(HOSTILE);
        }
        sim.settle(50_000);
        let jobs = sim.final_check();
        eprintln!(
            "seed {seed}: {} completed ops ({} of unknown fate until retried), {jobs} jobs, {} terms",
            sim.history.completed(),
            sim.history.unknown(),
            sim.terms()
        );
        // The run must have done real work under faults, or it proves nothing.
        assert!(
            sim.history.completed() > 100,
            "seed {seed}: too little progress"
        );
        assert!(sim.terms() > 1, "seed {seed}: no leader change happened");
    }
}

#[test]
fn five_members_survive_two_crashes_at_once() {
    for seed in seeds(&[11, 12]) {
        let mut sim = Sim::new(seed, 5, 4, 40);
        for _ in 0..2_000 {
            sim.step(HOSTILE);
        }
        let leader = sim.leader().unwrap_or(1);
        let other = if leader == 5 { 4 } else { 5 };
        sim.crash(leader);
        sim.crash(other);
        for _ in 0..3_000 {
            sim.step(Faults {
                crash: 0,
                ..HOSTILE
            });
        }
        sim.settle(50_000);
        sim.final_check();
        assert!(sim.terms() > 1, "seed {seed}: no leader change happened");
    }
}

#[test]
fn an_isolated_leader_commits_nothing_and_the_majority_moves_on() {
    for seed in seeds(&[21, 22]) {
        let mut sim = Sim::new(seed, 3, 3, 1_000);
        for _ in 0..1_000 {
            sim.step(Faults::NONE);
        }
        let old = sim.leader().expect("a leader after 1000 quiet steps");
        sim.isolate(old);
        // Its clients keep writing to it; the tests on the history show that
        // none of those writes was acknowledged unless it really committed.
        for _ in 0..3_000 {
            sim.step(Faults::NONE);
        }
        let new = sim.leader().expect("the majority elected a leader");
        assert_ne!(new, old, "seed {seed}");
        sim.settle(50_000);
        sim.final_check();
    }
}

#[test]
fn a_member_that_lost_its_disk_is_replaced_and_catches_up_from_a_snapshot() {
    for seed in seeds(&[31, 32]) {
        // A small snapshot interval: the new member cannot be served from
        // the log alone.
        let mut sim = Sim::new(seed, 3, 4, 20);
        for _ in 0..3_000 {
            sim.step(Faults {
                crash: 0,
                partition: 0,
                ..HOSTILE
            });
        }
        sim.settle(50_000);
        let victim = (1..=3).find(|id| Some(*id) != sim.leader()).unwrap();
        sim.replace_lost_member(victim, 4);
        let leader = sim.leader().unwrap();
        let mut voters = sim.voters(leader);
        voters.sort();
        let mut expect: Vec<u64> = (1..=4).filter(|id| *id != victim).collect();
        expect.sort();
        assert_eq!(voters, expect, "seed {seed}");
        for _ in 0..3_000 {
            sim.step(Faults {
                crash: 0,
                ..HOSTILE
            });
        }
        sim.settle(50_000);
        sim.final_check();
    }
}
