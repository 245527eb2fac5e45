//! Flags resolved once, before anything is read or written: each command's flags become one
//! settings value of library types (ripgrep's `LowArgs` -> `HiArgs`). Every rule that relates
//! flags to each other is here, so an invalid combination is a usage error (exit 2) raised before
//! the output folder is touched.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::args::{
    BenchArgs, Command, DEFAULT_CONCURRENCY, EngineFlags, ExportArgs, ExportFormat, FetchArgs,
    HttpFlags, LsArgs, MemoryFlag, PlanArgs, PlanFlags, S3Flags, SelectFlags, ShardArg, VerifyArgs,
};
use super::printer::{Printer, ReportFormat};
use crate::export::ExportOptions;
use crate::export::output::Target as ExportTarget;
use crate::fetch::EngineOptions;
use crate::pipeline::Target;
use crate::plan::{PlanOptions, Share};
use crate::selection::{SelectionError, Spec};
use crate::sink::StreamFormat;
use crate::source::{HttpOptions, RetryPolicy, S3Options};
use crate::units::{ByteSize, human};

/// A combination of flags that cannot run.
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Selection(#[from] SelectionError),
}

fn invalid(message: impl Into<String>) -> UsageError {
    UsageError::Invalid(message.into())
}

/// A command with its settings resolved.
#[derive(Debug)]
pub enum Settings {
    Ls(LsSettings),
    Plan(PlanSettings),
    Fetch(FetchSettings),
    Export(ExportSettings),
    Verify(VerifySettings),
    /// `verify --combine`: the reports of every share, into one verdict.
    Combine(CombineSettings),
    Bench(BenchSettings),
    Completions(clap_complete::Shell),
}

/// Which share of the work this run does (`--shard`), and, when `--shard auto` found it in the
/// environment, where (printed on stderr).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sharding {
    pub share: Share,
    pub from: Option<String>,
}

impl Sharding {
    /// The whole work (no `--shard`).
    pub const WHOLE: Sharding = Sharding {
        share: Share::WHOLE,
        from: None,
    };
}

#[derive(Debug)]
pub struct LsSettings {
    pub target: Target,
    pub printer: Printer,
}

#[derive(Debug)]
pub struct PlanSettings {
    pub target: Target,
    pub plan: PlanOptions,
    /// List every range group, not only the per-file summary.
    pub groups: bool,
    /// Files statted at once.
    pub in_flight: usize,
    /// `--shard`: the plan of this share.
    pub shard: Sharding,
    /// `--shards N`: the balance of N shares.
    pub shares: Option<u32>,
    pub printer: Printer,
}

/// Where fetched items go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// A sparse copy of the checkpoint in a folder.
    Dir {
        path: PathBuf,
        resume: bool,
        force: bool,
    },
    /// A byte stream on stdout, with an optional JSON manifest of where each item is.
    Stdout {
        format: StreamFormat,
        manifest: Option<PathBuf>,
    },
}

#[derive(Debug)]
pub struct FetchSettings {
    pub target: Target,
    pub plan: PlanOptions,
    pub engine: EngineOptions,
    pub output: Output,
    pub shard: Sharding,
    pub printer: Printer,
}

#[derive(Debug)]
pub struct ExportSettings {
    pub target: Target,
    pub plan: PlanOptions,
    pub engine: EngineOptions,
    pub output: ExportTarget,
    pub options: ExportOptions,
    /// Replace an existing output.
    pub force: bool,
    pub printer: Printer,
}

#[derive(Debug)]
pub struct VerifySettings {
    pub target: Target,
    pub plan: PlanOptions,
    pub engine: EngineOptions,
    /// Metadata and sizes only.
    pub quick: bool,
    /// A sha256 manifest to compare with, or to write.
    pub manifest: Option<PathBuf>,
    pub shard: Sharding,
    pub printer: Printer,
}

#[derive(Debug)]
pub struct CombineSettings {
    /// The `verify --shard I/N --json` reports, one per share.
    pub reports: Vec<PathBuf>,
    pub printer: Printer,
}

/// One setting of a sweep.
#[derive(Debug, Clone, Copy)]
pub struct Trial {
    pub plan: PlanOptions,
    pub engine: EngineOptions,
}

#[derive(Debug)]
pub struct BenchSettings {
    pub target: Target,
    /// Every combination of gap size, concurrency and part size, in sweep order.
    pub trials: Vec<Trial>,
    pub repeat: u32,
    /// Fetch into this folder (refused unless it is empty or an earlier bench's) instead of a
    /// null sink.
    pub output: Option<PathBuf>,
    pub plot: Option<PathBuf>,
    pub printer: Printer,
}

impl Settings {
    /// Resolves a parsed command line.
    pub fn resolve(command: Command) -> Result<Settings, UsageError> {
        Ok(match command {
            Command::Ls(a) => Settings::Ls(ls(a)?),
            Command::Plan(a) => Settings::Plan(plan(a)?),
            Command::Fetch(a) => Settings::Fetch(fetch(a)?),
            Command::Export(a) => Settings::Export(export(a)?),
            Command::Verify(a) if !a.combine.is_empty() => Settings::Combine(CombineSettings {
                reports: a.combine,
                printer: Printer::report(ReportFormat::json_if(a.json)),
            }),
            Command::Verify(a) => Settings::Verify(verify(a)?),
            Command::Bench(a) => Settings::Bench(bench(a)?),
            Command::Completions { shell } => Settings::Completions(shell),
        })
    }
}

/// The checkpoint, how to reach it and what to select.
fn target(
    location: crate::source::Location,
    s3: &S3Flags,
    http_flags: &HttpFlags,
    select: &SelectFlags,
) -> Result<Target, UsageError> {
    let spec = match &select.spec {
        Some(path) => Spec::from_file(path)?,
        None => Spec::default(),
    };
    let mut store = store_options(s3)?;
    let mut http = HttpOptions::resolve(
        &http_flags.headers,
        http_flags.ca_bundle.clone(),
        |var| std::env::var(var).ok(),
        store.retry,
    )
    .map_err(UsageError::Invalid)?;
    if let Some(path) = &http_flags.url_list {
        if !matches!(location, crate::source::Location::Http { .. }) {
            return Err(invalid(format!(
                "--url-list is for http:// and https:// checkpoints, not {location}"
            )));
        }
        let list =
            crate::source::UrlList::read(path).map_err(|e| invalid(format!("--url-list {e}")))?;
        http.urls = Some(std::sync::Arc::new(list));
    }
    // An S3 endpoint with a private CA is trusted the same way.
    store.ca_bundle = http.ca_bundle.clone();
    Ok(Target {
        location,
        store,
        http,
        spec: spec.with_globs(&select.select, &select.exclude),
    })
}

fn store_options(s3: &S3Flags) -> Result<S3Options, UsageError> {
    if let Some(url) = &s3.endpoint_url {
        let scheme = url.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
        if !matches!(scheme.as_deref(), Some("http" | "https")) {
            let host = url.split_once("://").map_or(url.as_str(), |(_, h)| h);
            return Err(invalid(format!(
                "--endpoint-url {url} needs a scheme: pass --endpoint-url http://{host} \
                 (or https://{host})"
            )));
        }
    }
    for (flag, value) in [
        ("--stall-timeout", s3.stall_timeout),
        ("--request-timeout", s3.request_timeout),
    ] {
        if value.is_nan() || value <= 0.0 {
            return Err(invalid(format!(
                "{flag} must be a positive number of seconds, not {value}"
            )));
        }
    }
    let seconds = |s: f64| Duration::from_secs_f64(s.clamp(0.05, 86_400.0));
    Ok(S3Options {
        region: s3.region.clone(),
        profile: s3.profile.clone(),
        endpoint_url: s3.endpoint_url.clone(),
        path_style: s3.path_style,
        virtual_hosted: s3.virtual_hosted,
        no_sign_request: s3.no_sign_request,
        ca_bundle: None,
        retry: RetryPolicy {
            max_attempts: s3.max_attempts,
            stall_timeout: seconds(s3.stall_timeout),
            request_timeout: seconds(s3.request_timeout),
            ..RetryPolicy::default()
        },
    })
}

/// The one builder of plan and engine options, shared by fetch, verify and every trial of bench.
pub fn plan_and_engine(
    max_gap: ByteSize,
    part_size: ByteSize,
    concurrency: u32,
    memory: MemoryFlag,
) -> Result<Trial, UsageError> {
    if part_size.0 == 0 || part_size.is_inf() {
        return Err(invalid(format!(
            "--part-size must be a positive number of bytes, not {part_size}"
        )));
    }
    if concurrency == 0 {
        return Err(invalid("--concurrency must be at least 1"));
    }
    let max_memory = memory.max_memory;
    if max_memory.0 == 0 || max_memory.is_inf() {
        return Err(invalid(format!(
            "--max-memory must be a positive number of bytes, not {max_memory}"
        )));
    }
    if part_size.0 > max_memory.0 {
        return Err(invalid(format!(
            "--part-size ({}) must not exceed --max-memory ({}): a request is held whole",
            human(part_size.0),
            human(max_memory.0)
        )));
    }
    Ok(Trial {
        plan: PlanOptions {
            max_gap: max_gap.0,
            part_size: part_size.0,
        },
        engine: EngineOptions {
            concurrency: concurrency as usize,
            max_memory: max_memory.0,
        },
    })
}

fn engine_flags(plan: &PlanFlags, engine: &EngineFlags) -> Result<Trial, UsageError> {
    plan_and_engine(
        plan.max_gap_size,
        plan.part_size,
        engine.concurrency,
        engine.memory,
    )
}

/// The plan options alone (`plan`), validated as a fetch would validate them.
fn plan_flags(plan: &PlanFlags) -> Result<PlanOptions, UsageError> {
    let memory = MemoryFlag {
        max_memory: ByteSize(u64::MAX - 1),
    };
    Ok(plan_and_engine(plan.max_gap_size, plan.part_size, 1, memory)?.plan)
}

/// The process environment, as `--shard auto` reads it.
fn env(var: &str) -> Option<String> {
    std::env::var(var).ok()
}

/// `--shard`, resolved: given, taken from the environment (`env`), or the whole work.
fn sharding(
    arg: Option<ShardArg>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Sharding, UsageError> {
    match arg {
        None => Ok(Sharding::WHOLE),
        Some(ShardArg::Given(share)) => Ok(Sharding { share, from: None }),
        Some(ShardArg::Auto(count)) => {
            let (share, from) = share_from_environment(count, env)?;
            Ok(Sharding {
                share,
                from: Some(from),
            })
        }
    }
}

/// What a scheduler's variables say: (index, count, description).
type Found = (u64, u64, String);

/// `--shard auto` (`count` with `auto/N`): the share from the variables of Slurm job arrays,
/// Slurm steps, Kubernetes Indexed Jobs (which give only the index, so N must be given), torchrun
/// and Open MPI. Schedulers that say "1 task" are ignored when another says more (a one-task
/// Slurm step inside a job array, torchrun with one process); the others must agree with each
/// other and with `count`. Anything missing, malformed or conflicting is a usage error.
pub fn share_from_environment(
    count: Option<u32>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(Share, String), UsageError> {
    let num =
        |var: &str| -> Result<Option<u64>, UsageError> {
            match env(var) {
                None => Ok(None),
                Some(v) => v.trim().parse::<u64>().map(Some).map_err(|_| {
                    invalid(format!("--shard auto: {var}={v:?} is not a whole number"))
                }),
            }
        };
    let pair = |index: &str, size: &str, what: &str| -> Result<Option<Found>, UsageError> {
        match (num(index)?, num(size)?) {
            (None, None) => Ok(None),
            (Some(i), Some(n)) => Ok(Some((i, n, format!("{what} ({index}={i}, {size}={n})")))),
            (Some(_), None) => Err(invalid(format!(
                "--shard auto: {index} is set but {size} is not; pass --shard I/N"
            ))),
            (None, Some(_)) => Err(invalid(format!(
                "--shard auto: {size} is set but {index} is not; pass --shard I/N"
            ))),
        }
    };
    let mut found: Vec<Found> = Vec::new();
    if let Some(id) = num("SLURM_ARRAY_TASK_ID")? {
        let (min, max, n) = (
            num("SLURM_ARRAY_TASK_MIN")?,
            num("SLURM_ARRAY_TASK_MAX")?,
            num("SLURM_ARRAY_TASK_COUNT")?,
        );
        let n = match (n, min, max) {
            (Some(n), Some(lo), Some(hi)) if hi < lo || hi - lo + 1 != n => {
                return Err(invalid(format!(
                    "--shard auto: the Slurm job array's task ids are not contiguous \
                     (SLURM_ARRAY_TASK_MIN={lo}, SLURM_ARRAY_TASK_MAX={hi}, SLURM_ARRAY_TASK_COUNT={n}); \
                     submit it with --array=0-{} or pass --shard I/N",
                    n.saturating_sub(1)
                )));
            }
            (Some(n), ..) => n,
            (None, Some(lo), Some(hi)) if hi >= lo => hi - lo + 1,
            _ => {
                return Err(invalid(
                    "--shard auto: SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT (or \
                     SLURM_ARRAY_TASK_MIN and SLURM_ARRAY_TASK_MAX) is not; pass --shard I/N",
                ));
            }
        };
        let lo = min.unwrap_or(0);
        let Some(i) = id.checked_sub(lo) else {
            return Err(invalid(format!(
                "--shard auto: SLURM_ARRAY_TASK_ID={id} is below SLURM_ARRAY_TASK_MIN={lo}"
            )));
        };
        found.push((
            i,
            n,
            format!(
                "the Slurm job array (SLURM_ARRAY_TASK_ID={id}, SLURM_ARRAY_TASK_MIN={lo}, \
                 SLURM_ARRAY_TASK_COUNT={n})"
            ),
        ));
    }
    found.extend(pair("SLURM_PROCID", "SLURM_NTASKS", "the Slurm step")?);
    if let Some(i) = num("JOB_COMPLETION_INDEX")? {
        let Some(n) = count else {
            return Err(invalid(format!(
                "--shard auto: a Kubernetes Indexed Job (JOB_COMPLETION_INDEX={i}) does not say how \
                 many indexes there are; pass --shard auto/N with N the Job's completions"
            )));
        };
        found.push((
            i,
            u64::from(n),
            format!("the Kubernetes Indexed Job (JOB_COMPLETION_INDEX={i}, N={n} from --shard)"),
        ));
    }
    found.extend(pair("RANK", "WORLD_SIZE", "torchrun")?);
    found.extend(pair(
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_SIZE",
        "Open MPI",
    )?);

    if found.iter().any(|f| f.1 > 1) {
        found.retain(|f| f.1 > 1);
    }
    let Some((index, n, from)) = found.first().cloned() else {
        return Err(invalid(
            "--shard auto found no scheduler's variables: it reads Slurm (SLURM_ARRAY_TASK_ID and \
             SLURM_ARRAY_TASK_COUNT, or SLURM_PROCID and SLURM_NTASKS), Kubernetes Indexed Jobs \
             (JOB_COMPLETION_INDEX, with --shard auto/N), torchrun (RANK and WORLD_SIZE) and Open MPI \
             (OMPI_COMM_WORLD_RANK and OMPI_COMM_WORLD_SIZE); pass --shard I/N otherwise",
        ));
    };
    if let Some(other) = found.iter().find(|f| (f.0, f.1) != (index, n)) {
        return Err(invalid(format!(
            "--shard auto: the environment disagrees with itself: {from} says share {index} of {n}, \
             {} says {} of {}; pass --shard I/N",
            other.2, other.0, other.1
        )));
    }
    if let Some(want) = count
        && u64::from(want) != n
    {
        return Err(invalid(format!(
            "--shard auto/{want}: {from} says there are {n} shares, not {want}"
        )));
    }
    let share = u32::try_from(n)
        .ok()
        .zip(u32::try_from(index).ok())
        .and_then(|(n, i)| Share::new(i, n));
    match share {
        Some(share) => Ok((share, from)),
        None if n == 0 => Err(invalid(format!(
            "--shard auto: {from} says there are 0 shares"
        ))),
        None => Err(invalid(format!(
            "--shard auto: {from} gives index {index}, outside 0 .. {}",
            n.saturating_sub(1)
        ))),
    }
}

fn ls(a: LsArgs) -> Result<LsSettings, UsageError> {
    Ok(LsSettings {
        target: target(a.checkpoint, &a.s3, &a.http, &a.selection)?,
        printer: Printer::report(ReportFormat::json_if(a.json)),
    })
}

fn plan(a: PlanArgs) -> Result<PlanSettings, UsageError> {
    Ok(PlanSettings {
        plan: plan_flags(&a.plan)?,
        target: target(a.checkpoint, &a.s3, &a.http, &a.selection)?,
        groups: a.groups,
        in_flight: DEFAULT_CONCURRENCY as usize,
        shard: sharding(a.shard, &env)?,
        shares: a.shards,
        printer: Printer::report(ReportFormat::json_if(a.json)),
    })
}

fn fetch(a: FetchArgs) -> Result<FetchSettings, UsageError> {
    if a.dry_run {
        // A dry run that printed the plan would put a table where `-o -` puts bytes and would
        // not know what `--resume` skips: refused, with the command that answers the question.
        return Err(invalid(format!(
            "fetch has no --dry-run: `dcpfetch plan {}` with the same selection flags shows the \
             files, byte ranges, requests and bytes a fetch would read, without fetching",
            a.checkpoint
        )));
    }
    let Some(output) = a.output else {
        return Err(invalid(
            "fetch needs -o DIR (a sparse copy) or -o - (stdout)",
        ));
    };
    let to_stdout = output == Path::new("-");
    let output = if to_stdout {
        if a.resume {
            return Err(invalid("--resume goes with -o DIR, not with stdout"));
        }
        if a.force {
            return Err(invalid("--force goes with -o DIR, not with stdout"));
        }
        Output::Stdout {
            format: a.format,
            manifest: a.manifest,
        }
    } else {
        if a.manifest.is_some() || a.format != StreamFormat::Raw {
            return Err(invalid("--manifest and --format go with -o - (stdout)"));
        }
        Output::Dir {
            path: output,
            resume: a.resume,
            force: a.force,
        }
    };
    let trial = engine_flags(&a.plan, &a.engine)?;
    let shard = sharding(a.shard, &env)?;
    Ok(FetchSettings {
        target: target(a.checkpoint, &a.s3, &a.http, &a.selection)?,
        plan: trial.plan,
        engine: trial.engine,
        printer: Printer::run(ReportFormat::json_if(a.json), a.quiet, to_stdout)
            .hide_progress(a.no_progress),
        output,
        shard,
    })
}

fn export(a: ExportArgs) -> Result<ExportSettings, UsageError> {
    let to_stdout = a.output == Path::new("-");
    let output = match (to_stdout, a.max_shard_size) {
        (true, Some(_)) => {
            return Err(invalid(
                "--max-shard-size writes a folder, not stdout: give -o DIR",
            ));
        }
        (true, None) if a.force => {
            return Err(invalid("--force goes with -o FILE, not with stdout"));
        }
        (true, None) => ExportTarget::Stdout,
        (false, Some(_)) if a.format == ExportFormat::Npy => {
            return Err(invalid("--max-shard-size goes with safetensors, not npy"));
        }
        (false, Some(_)) => ExportTarget::Folder(a.output),
        (false, None) => ExportTarget::File(a.output),
    };
    let rename = a
        .rename
        .iter()
        .map(|r| match r.split_once('=') {
            Some((from, to)) if !from.is_empty() => Ok((from.to_owned(), to.to_owned())),
            _ => Err(invalid(format!(
                "--rename {r:?}: expected FROM=TO with a FROM that is not empty"
            ))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    if a.max_shard_size.is_some_and(|s| s.0 == 0) {
        return Err(invalid("--max-shard-size must be more than 0"));
    }
    let trial = engine_flags(&a.plan, &a.engine)?;
    Ok(ExportSettings {
        target: target(a.checkpoint, &a.s3, &a.http, &a.selection)?,
        plan: trial.plan,
        engine: trial.engine,
        output,
        options: ExportOptions {
            format: a.format,
            max_shard_size: a.max_shard_size.map(|s| s.0),
            strip_prefix: a.strip_prefix,
            rename,
            skip_unsupported: a.skip_unsupported,
            read_order: to_stdout,
        },
        force: a.force,
        printer: Printer::run(ReportFormat::json_if(a.json), a.quiet, to_stdout)
            .hide_progress(a.no_progress),
    })
}

fn verify(a: VerifyArgs) -> Result<VerifySettings, UsageError> {
    let trial = engine_flags(&a.plan, &a.engine)?;
    let shard = sharding(a.shard, &env)?;
    if !shard.share.is_whole() && a.manifest.is_some() {
        return Err(invalid(
            "--manifest hashes whole files and goes without --shard: run it on one machine",
        ));
    }
    let Some(checkpoint) = a.checkpoint else {
        return Err(invalid(
            "verify needs a checkpoint (or --combine REPORT.json ...)",
        ));
    };
    Ok(VerifySettings {
        shard,
        target: target(checkpoint, &a.s3, &a.http, &a.selection)?,
        plan: trial.plan,
        engine: trial.engine,
        quick: a.quick,
        manifest: a.manifest,
        printer: Printer::run(ReportFormat::json_if(a.json), a.quiet, false)
            .hide_progress(a.no_progress),
    })
}

fn bench(a: BenchArgs) -> Result<BenchSettings, UsageError> {
    if let Some(path) = &a.plot
        && !path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("svg"))
    {
        return Err(invalid(format!(
            "--plot draws SVG, so its file must end in .svg (not {}); for a PNG, convert it, e.g. \
             `rsvg-convert -o sweep.png sweep.svg`",
            path.display()
        )));
    }
    let mut trials = Vec::new();
    for &gap in &a.gap_sizes {
        for &concurrency in &a.concurrency {
            for &part in &a.part_sizes {
                trials.push(plan_and_engine(gap, part, concurrency, a.memory)?);
            }
        }
    }
    if trials.is_empty() {
        return Err(invalid(
            "the sweep is empty: give at least one gap size, concurrency and part size",
        ));
    }
    let format = if a.json {
        ReportFormat::Json
    } else if a.csv {
        ReportFormat::Csv
    } else {
        ReportFormat::Table
    };
    Ok(BenchSettings {
        target: {
            let mut t = target(a.checkpoint, &a.s3, &a.http, &a.selection)?;
            // A sweep measures the concurrency it names, not the HTTP ramp's choice.
            t.http.no_ramp = true;
            t
        },
        trials,
        repeat: a.repeat,
        output: a.output,
        plot: a.plot,
        printer: Printer::run(format, a.quiet, false).hide_progress(a.no_progress),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Cli;
    use clap::Parser;

    fn resolve(args: &[&str]) -> Result<Settings, UsageError> {
        let cli = Cli::try_parse_from(std::iter::once("dcpfetch").chain(args.iter().copied()))
            .expect("parses");
        Settings::resolve(cli.command)
    }

    #[test]
    fn invalid_combinations_are_usage_errors() {
        let cases: &[(&[&str], &str)] = &[
            (
                &["fetch", "x", "-o", "d", "--part-size", "0"],
                "--part-size",
            ),
            (
                &["fetch", "x", "-o", "d", "--part-size", "inf"],
                "--part-size",
            ),
            (
                &[
                    "fetch",
                    "x",
                    "-o",
                    "d",
                    "--part-size",
                    "64MiB",
                    "--max-memory",
                    "32MiB",
                ],
                "must not exceed --max-memory",
            ),
            (
                &["fetch", "x", "-o", "d", "--max-memory", "0"],
                "--max-memory",
            ),
            (&["fetch", "x", "-o", "-", "--resume"], "--resume"),
            (&["fetch", "x", "-o", "-", "--force"], "--force"),
            (&["fetch", "x", "-o", "d", "--format", "tar"], "-o -"),
            (&["fetch", "x", "-o", "d", "--manifest", "m.json"], "-o -"),
            (&["verify", "x", "--part-size", "0"], "--part-size"),
            (
                &["verify", "x", "--part-size", "1GiB", "--max-memory", "8MiB"],
                "--max-memory",
            ),
            (&["plan", "x", "--part-size", "0"], "--part-size"),
            (&["bench", "x", "--concurrency", "4,0"], "--concurrency"),
            (&["bench", "x", "--part-sizes", "8MiB,0"], "--part-size"),
            (
                &["bench", "x", "--part-sizes", "1GiB", "--max-memory", "8MiB"],
                "--max-memory",
            ),
            (&["bench", "x", "--plot", "sweep.png"], ".svg"),
            (&["fetch", "x", "-o", "d", "--dry-run"], "dcpfetch plan x"),
            (&["fetch", "x", "--dryrun"], "dcpfetch plan x"),
        ];
        for (args, needle) in cases {
            match resolve(args) {
                Err(e) => assert!(e.to_string().contains(needle), "{args:?}: {e}"),
                Ok(s) => panic!("{args:?} resolved to {s:?}"),
            }
        }
    }

    #[test]
    fn output_is_one_enum() {
        let Settings::Fetch(f) = resolve(&["fetch", "x", "-o", "-", "--format", "tar"]).unwrap()
        else {
            panic!()
        };
        assert_eq!(
            f.output,
            Output::Stdout {
                format: StreamFormat::Tar,
                manifest: None
            }
        );
        let Settings::Fetch(f) = resolve(&["fetch", "x", "-o", "d", "--resume"]).unwrap() else {
            panic!()
        };
        assert_eq!(
            f.output,
            Output::Dir {
                path: "d".into(),
                resume: true,
                force: false
            }
        );
    }

    #[test]
    fn aliases_of_other_tools() {
        let Settings::Ls(l) = resolve(&["ls", "x", "--include", "a.*", "-s", "b.*"]).unwrap()
        else {
            panic!()
        };
        let Settings::Ls(s) = resolve(&["ls", "x", "--select", "a.*", "-s", "b.*"]).unwrap() else {
            panic!()
        };
        assert_eq!(l.target.spec, s.target.spec);
        assert_eq!(l.target.spec.select, ["a.*", "b.*"]);

        let no_bar = Printer::run(ReportFormat::Table, false, false).hide_progress(true);
        let Settings::Fetch(f) = resolve(&["fetch", "x", "-o", "d", "--no-progress"]).unwrap()
        else {
            panic!()
        };
        assert_eq!(f.printer, no_bar);
        let Settings::Verify(v) = resolve(&["verify", "x", "--no-progress"]).unwrap() else {
            panic!()
        };
        assert_eq!(v.printer, no_bar);
        let Settings::Bench(b) = resolve(&["bench", "x", "--no-progress"]).unwrap() else {
            panic!()
        };
        assert_eq!(b.printer, no_bar);
        let Settings::Fetch(f) = resolve(&["fetch", "x", "-o", "d"]).unwrap() else {
            panic!()
        };
        assert!(f.printer.shows_progress());
    }

    #[test]
    fn bench_trials_are_the_product_of_the_lists() {
        let Settings::Bench(b) = resolve(&[
            "bench",
            "x",
            "--gap-sizes",
            "0,inf",
            "--concurrency",
            "1,8,32",
            "--part-sizes",
            "1MiB",
        ])
        .unwrap() else {
            panic!()
        };
        assert_eq!(b.trials.len(), 6);
        assert_eq!(b.trials[1].engine.concurrency, 8);
        assert!(
            b.target.http.no_ramp,
            "a sweep measures the concurrency it names"
        );
        assert!(ByteSize(b.trials[5].plan.max_gap).is_inf());
        assert!(b.trials.iter().all(|t| t.plan.part_size == 1 << 20));
    }

    #[test]
    fn shard_from_the_environment() {
        // (variables, --shard auto/N count, the share or a piece of the error)
        type Case<'a> = (
            &'a [(&'a str, &'a str)],
            Option<u32>,
            Result<(u32, u32), &'a str>,
        );
        let cases: &[Case] = &[
            (
                &[
                    ("SLURM_ARRAY_TASK_ID", "3"),
                    ("SLURM_ARRAY_TASK_COUNT", "8"),
                ],
                None,
                Ok((3, 8)),
            ),
            (
                &[
                    ("SLURM_ARRAY_TASK_ID", "12"),
                    ("SLURM_ARRAY_TASK_MIN", "10"),
                    ("SLURM_ARRAY_TASK_MAX", "13"),
                    ("SLURM_ARRAY_TASK_COUNT", "4"),
                ],
                None,
                Ok((2, 4)),
            ),
            (
                &[
                    ("SLURM_ARRAY_TASK_ID", "4"),
                    ("SLURM_ARRAY_TASK_MIN", "0"),
                    ("SLURM_ARRAY_TASK_MAX", "12"),
                    ("SLURM_ARRAY_TASK_COUNT", "4"),
                ],
                None,
                Err("not contiguous"),
            ),
            (
                &[
                    ("SLURM_ARRAY_TASK_ID", "1"),
                    ("SLURM_ARRAY_TASK_MIN", "0"),
                    ("SLURM_ARRAY_TASK_MAX", "3"),
                ],
                None,
                Ok((1, 4)),
            ),
            (
                &[("SLURM_ARRAY_TASK_ID", "1")],
                None,
                Err("SLURM_ARRAY_TASK_COUNT"),
            ),
            // A job array task's own one-task step does not count.
            (
                &[
                    ("SLURM_ARRAY_TASK_ID", "2"),
                    ("SLURM_ARRAY_TASK_COUNT", "4"),
                    ("SLURM_PROCID", "0"),
                    ("SLURM_NTASKS", "1"),
                ],
                None,
                Ok((2, 4)),
            ),
            (
                &[("SLURM_PROCID", "5"), ("SLURM_NTASKS", "16")],
                None,
                Ok((5, 16)),
            ),
            (&[("SLURM_PROCID", "5")], None, Err("SLURM_NTASKS is not")),
            (&[("JOB_COMPLETION_INDEX", "2")], Some(4), Ok((2, 4))),
            (
                &[("JOB_COMPLETION_INDEX", "2")],
                None,
                Err("--shard auto/N"),
            ),
            (
                &[("JOB_COMPLETION_INDEX", "4")],
                Some(4),
                Err("outside 0 .. 3"),
            ),
            (&[("RANK", "1"), ("WORLD_SIZE", "2")], None, Ok((1, 2))),
            (&[("RANK", "1"), ("WORLD_SIZE", "2")], Some(2), Ok((1, 2))),
            (
                &[("RANK", "1"), ("WORLD_SIZE", "2")],
                Some(3),
                Err("2 shares, not 3"),
            ),
            (&[("WORLD_SIZE", "2")], None, Err("RANK is not")),
            (
                &[("RANK", "x"), ("WORLD_SIZE", "2")],
                None,
                Err("not a whole number"),
            ),
            (
                &[("OMPI_COMM_WORLD_RANK", "0"), ("OMPI_COMM_WORLD_SIZE", "3")],
                None,
                Ok((0, 3)),
            ),
            // torchrun under a Slurm step that agrees, and one that does not.
            (
                &[
                    ("RANK", "3"),
                    ("WORLD_SIZE", "4"),
                    ("SLURM_PROCID", "3"),
                    ("SLURM_NTASKS", "4"),
                ],
                None,
                Ok((3, 4)),
            ),
            (
                &[
                    ("RANK", "3"),
                    ("WORLD_SIZE", "8"),
                    ("SLURM_PROCID", "1"),
                    ("SLURM_NTASKS", "2"),
                ],
                None,
                Err("disagrees"),
            ),
            (&[("RANK", "0"), ("WORLD_SIZE", "0")], None, Err("0 shares")),
            (&[("RANK", "0"), ("WORLD_SIZE", "1")], None, Ok((0, 1))),
            (&[], None, Err("found no scheduler")),
            (&[("HOME", "/root")], Some(2), Err("found no scheduler")),
        ];
        for (vars, count, want) in cases {
            let env = |v: &str| {
                vars.iter()
                    .find(|(k, _)| *k == v)
                    .map(|(_, x)| x.to_string())
            };
            let got = share_from_environment(*count, &env);
            match (got, want) {
                (Ok((share, from)), Ok((i, n))) => {
                    assert_eq!((share.index, share.count), (*i, *n), "{vars:?}");
                    assert!(!from.is_empty());
                }
                (Err(e), Err(needle)) => assert!(e.to_string().contains(needle), "{vars:?}: {e}"),
                (got, want) => panic!("{vars:?} {count:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn shard_flags() {
        let Settings::Fetch(f) = resolve(&["fetch", "x", "-o", "d", "--shard", "2/5"]).unwrap()
        else {
            panic!()
        };
        assert_eq!(f.shard.share, Share::new(2, 5).unwrap());
        assert_eq!(f.shard.from, None);
        let Settings::Fetch(f) = resolve(&["fetch", "x", "-o", "d"]).unwrap() else {
            panic!()
        };
        assert_eq!(f.shard, Sharding::WHOLE);
        for bad in ["5/5", "1/0", "a/b", "3", "-1/2", "auto/0"] {
            let parsed = Cli::try_parse_from(["dcpfetch", "fetch", "x", "-o", "d", "--shard", bad]);
            assert!(parsed.is_err(), "{bad}");
        }
        assert!(matches!(
            resolve(&["verify", "x", "--shard", "0/2", "--manifest", "m.json"]),
            Err(UsageError::Invalid(m)) if m.contains("--manifest")
        ));
        assert!(matches!(
            resolve(&["verify", "--combine", "a.json", "b.json"]).unwrap(),
            Settings::Combine(c) if c.reports.len() == 2
        ));
    }
}
