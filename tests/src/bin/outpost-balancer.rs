//! The suites' round-robin TCP balancer (`outpost_e2e::balancer`) as a process, for the
//! benchmarks: `outpost-balancer --listen 127.0.0.1:PORT --backend HOST:PORT[,READYZ-URL]...`
//! prints `listening on ADDR` once it accepts connections, then runs until killed. Commands on
//! standard input change it while it runs, one a line: `add HOST:PORT[,READYZ-URL]`,
//! `remove HOST:PORT`, `stats` (one JSON line on standard output: per backend its readiness and
//! connection counts). `--stats-every SECONDS` prints that line periodically as well.

use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::time::Duration;

use outpost_e2e::balancer::{BackendSpec, Balancer};

const USAGE: &str = "usage: outpost-balancer [--listen 127.0.0.1:PORT] \
    --backend HOST:PORT[,http://HOST:PORT/readyz]... [--stats-every SECONDS]";

fn parse_args() -> Result<(SocketAddr, Vec<BackendSpec>, Option<Duration>), String> {
    let mut listen = SocketAddr::from(([127, 0, 0, 1], 0));
    let mut backends = Vec::new();
    let mut every = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--listen" => {
                let v = value()?;
                listen = v.parse().map_err(|_| format!("bad --listen {v:?}"))?;
            }
            "--backend" => backends.push(BackendSpec::parse(&value()?)?),
            "--stats-every" => {
                let v = value()?;
                let secs: f64 = v
                    .parse()
                    .ok()
                    .filter(|s: &f64| *s > 0.0 && s.is_finite())
                    .ok_or_else(|| format!("bad --stats-every {v:?}"))?;
                every = Some(Duration::from_secs_f64(secs));
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok((listen, backends, every))
}

fn print_stats(b: &Balancer) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", b.stats().to_json());
    let _ = out.flush();
}

fn main() {
    let (listen, backends, every) = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}\n{USAGE}");
            std::process::exit(2);
        }
    };
    let balancer = match Balancer::bind(listen, &backends) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: cannot listen on {listen}: {e}");
            std::process::exit(1);
        }
    };
    println!("listening on {}", balancer.addr());
    let _ = std::io::stdout().flush();
    std::thread::scope(|s| {
        let balancer = &balancer;
        if let Some(every) = every {
            s.spawn(move || {
                loop {
                    std::thread::sleep(every);
                    print_stats(balancer);
                }
            });
        }
        // Standard input closed (or never given): serve on until killed.
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            let mut words = line.split_whitespace();
            match (words.next(), words.next()) {
                (Some("add"), Some(spec)) => match BackendSpec::parse(spec) {
                    Ok(spec) => {
                        balancer.add(spec);
                    }
                    Err(e) => eprintln!("error: {e}"),
                },
                (Some("remove"), Some(addr)) => {
                    match addr.parse().ok().and_then(|a| balancer.id_of(a)) {
                        Some(id) => {
                            balancer.remove(id);
                        }
                        None => eprintln!("error: no backend {addr}"),
                    }
                }
                (Some("stats"), None) => print_stats(balancer),
                (None, _) => {}
                _ => eprintln!("error: unknown command {line:?} (add, remove, stats)"),
            }
        }
        loop {
            std::thread::park();
        }
    });
}
