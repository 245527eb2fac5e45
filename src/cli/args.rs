//! The command line as clap parses it (the doc comments are the help text): flags as typed, not
//! yet checked against each other. [`super::settings`] resolves them into what the library uses.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

pub use crate::export::Format as ExportFormat;
use crate::plan::Share;
use crate::sink::StreamFormat;
use crate::source::Location;
use crate::units::ByteSize;

/// Download exactly the bytes you need from a PyTorch Distributed Checkpoint (DCP) in S3 or a
/// local folder.
///
/// dcpfetch reads the checkpoint's `.metadata` without Python (and without running anything it
/// names), plans the byte ranges of the tensors you select, and fetches them concurrently into a
/// sparse local copy that `torch.distributed.checkpoint.load` reads, or onto stdout.
///
/// Exit codes: 0 success; 1 the check or fetch found a problem (a selection that matches nothing,
/// a failed verification, a missing or changed shard); 2 usage error or could not run (unreadable
/// metadata, no credentials, unreachable endpoint).
#[derive(Debug, Parser)]
#[command(name = "dcpfetch", version, max_term_width = 100, after_help = EXAMPLES)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log every request on stderr: method, key, byte range, HTTP status (or local), time
    /// taken and attempt number.
    #[arg(short = 'v', long, global = true)]
    pub verbose: bool,
}

// The examples end each help text; tests/cli.rs runs every one that reads a bundled fixture
// (fixtures/, from the repository's root) to keep them true.
const EXAMPLES: &str = "\
Examples:
  # the layer-0 tensors of a bundled fixture (run from the repository's root)
  dcpfetch ls fixtures/model --select 'model.layers.0.*'
  # the model without the optimizer state, from S3 into a sparse local copy
  dcpfetch fetch s3://bucket/run/step-1000 --exclude 'optim.*' -o model-only
  # completions in this bash session (README.md installs them for bash, zsh and fish)
  source <(dcpfetch completions bash)";

const LS_EXAMPLES: &str = "\
Examples:
  dcpfetch ls fixtures/model --select 'model.layers.0.*'
  dcpfetch ls fixtures/model --json | jq -r '.entries[].fqn'
  dcpfetch ls s3://bucket/run/step-1000 --region us-west-2";

const PLAN_EXAMPLES: &str = "\
Examples:
  dcpfetch plan fixtures/model --exclude 'optim.*'
  dcpfetch plan fixtures/model --exclude 'optim.*' --max-gap-size 0 --groups
  dcpfetch plan s3://bucket/run/step-1000 --select 'model.*' --json";

const FETCH_EXAMPLES: &str = "\
Examples:
  dcpfetch fetch fixtures/model --exclude 'optim.*' -o model-only
  dcpfetch fetch fixtures/model --select 'model.layers.0.*' -o - --format tar | tar -t
  dcpfetch fetch s3://bucket/run/step-1000 --exclude 'optim.*' -o model-only --resume";

const EXPORT_EXAMPLES: &str = "\
Examples:
  dcpfetch export fixtures/model --select 'model.*' --strip-prefix model. -o model.safetensors
  dcpfetch export fixtures/model --select 'model.*' --max-shard-size 64KiB -o model-hf
  dcpfetch export fixtures/model --select model.embed.weight --format npy -o embed.npy
  dcpfetch export s3://bucket/run/step-1000 --select 'model.*' -o - | python3 load.py";

const VERIFY_EXAMPLES: &str = "\
Examples:
  dcpfetch verify fixtures/model
  dcpfetch verify fixtures/model --quick --json
  dcpfetch verify s3://bucket/run/step-1000 --manifest integrity.json";

const BENCH_EXAMPLES: &str = "\
Examples:
  dcpfetch bench fixtures/model --repeat 1
  dcpfetch bench fixtures/model --gap-sizes 0,1MiB,inf --concurrency 4,32 --plot sweep.svg
  dcpfetch bench s3://bucket/run/step-1000 --endpoint-url http://127.0.0.1:9000 --path-style";

#[derive(Debug, Subcommand)]
pub enum Command {
    /// List the entries of a checkpoint: fqn, kind, dtype, shape, chunks, stored bytes, files.
    #[command(after_help = LS_EXAMPLES)]
    Ls(LsArgs),
    /// Show the byte ranges, range groups and requests a selection needs, without fetching.
    #[command(after_help = PLAN_EXAMPLES)]
    Plan(PlanArgs),
    /// Fetch the selected items into a sparse copy of the checkpoint (-o DIR) or to stdout (-o -).
    #[command(after_help = FETCH_EXAMPLES)]
    Fetch(FetchArgs),
    /// Export the selected tensors whole (sharded chunks assembled) as safetensors, one file or a
    /// Hugging Face folder, or one tensor as npy; no torch needed.
    #[command(after_help = EXPORT_EXAMPLES)]
    Export(ExportArgs),
    /// Check a checkpoint's integrity (for CI): metadata, files, sizes and, by default, every item's
    /// bytes. Exit 0 all good, 1 problems found, 2 could not run.
    ///
    /// It cannot tell two items of the same dtype and shape that swapped places in a shard file
    /// (torch would load the wrong tensors); --manifest, checked against a manifest written while
    /// the checkpoint was known good, catches that.
    #[command(after_help = VERIFY_EXAMPLES)]
    Verify(VerifyArgs),
    /// Measure fetch settings on your checkpoint and link: every combination of gap size,
    /// concurrency and part size, repeated, as a table, JSON, CSV or an SVG plot.
    #[command(after_help = BENCH_EXAMPLES)]
    Bench(BenchArgs),
    /// Print shell completions.
    Completions {
        /// The shell to print completions for.
        shell: clap_complete::Shell,
    },
}

/// `--shard`: a share given as `I/N`, or taken from the scheduler's environment (`auto`, or
/// `auto/N` when the environment gives only the index).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardArg {
    Given(Share),
    Auto(Option<u32>),
}

impl std::str::FromStr for ShardArg {
    type Err = String;

    fn from_str(s: &str) -> Result<ShardArg, String> {
        let count = |n: &str| match n.trim().parse::<u32>() {
            Ok(n) if n >= 1 => Ok(n),
            _ => Err(format!("{n:?} is not a number of shares (at least 1)")),
        };
        let (index, n) = match s.split_once('/') {
            Some((i, n)) => (i.trim(), Some(count(n)?)),
            None => (s.trim(), None),
        };
        if index.eq_ignore_ascii_case("auto") {
            return Ok(ShardArg::Auto(n));
        }
        let (Ok(index), Some(n)) = (index.parse::<u32>(), n) else {
            return Err(format!("expected I/N (0-based), auto or auto/N, not {s:?}"));
        };
        Share::new(index, n).map(ShardArg::Given).ok_or_else(|| {
            format!(
                "share {index} of {n} does not exist: I goes from 0 to {}",
                n - 1
            )
        })
    }
}

/// Options for reaching S3 (the default credential chain applies: environment, profiles, SSO, web
/// identity, instance metadata).
// The doc comments are the help text, where a URL stays as it is written.
#[allow(rustdoc::bare_urls)]
#[derive(Debug, Clone, Args, Default)]
#[command(next_help_heading = "S3")]
pub struct S3Flags {
    /// AWS region of the bucket (default: from the environment or profile, else us-east-1).
    #[arg(long, value_name = "REGION")]
    pub region: Option<String>,
    /// Named profile from the AWS config files.
    #[arg(long, value_name = "NAME")]
    pub profile: Option<String>,
    /// Custom S3 endpoint with its scheme, such as http://localhost:9000 for MinIO or a test
    /// server (AWS_ENDPOINT_URL also works). Uses path-style addressing unless --virtual-hosted.
    #[arg(long, value_name = "URL")]
    pub endpoint_url: Option<String>,
    /// Use path-style addressing (http://host/bucket/key): the default with a custom endpoint;
    /// kept for compatibility.
    #[arg(long, conflicts_with = "virtual_hosted")]
    pub path_style: bool,
    /// Use virtual-hosted addressing (http://bucket.host/key) with a custom endpoint too.
    #[arg(long)]
    pub virtual_hosted: bool,
    /// Send unsigned requests (public buckets).
    #[arg(long)]
    pub no_sign_request: bool,
    /// Attempts per request before giving up, the first included.
    #[arg(long, value_name = "N", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub max_attempts: u32,
    /// Abandon and resume a response that delivers nothing for this many seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 30.0)]
    pub stall_timeout: f64,
    /// Give up on one request (headers and body) after this many seconds, however fast its bytes
    /// trickle in; it counts as a failed attempt.
    #[arg(long, value_name = "SECONDS", default_value_t = 300.0)]
    pub request_timeout: f64,
}

/// Options for reaching a checkpoint at an http:// or https:// URL.
#[derive(Clone, Args, Default)]
#[command(next_help_heading = "HTTP")]
pub struct HttpFlags {
    /// Send this header with every request to the checkpoint's host, such as 'Authorization:
    /// Bearer TOKEN' (repeatable). Never sent to another host after a redirect, never printed.
    /// DCPFETCH_HTTP_HEADERS (one header a line) and DCPFETCH_HTTP_BEARER_TOKEN also work.
    #[arg(long = "header", short = 'H', value_name = "'NAME: VALUE'")]
    pub headers: Vec<String>,
    /// Trust only the CA certificates in this PEM file for https:// checkpoints and S3 endpoints
    /// (default: the system's, or those of SSL_CERT_FILE).
    #[arg(long, value_name = "FILE")]
    pub ca_bundle: Option<PathBuf>,
    /// For an http(s):// checkpoint: a file of URLs, one a line, for files that have URLs of
    /// their own (presigned or signed URLs); each is the URL of the file its path ends in. Files
    /// not in the list are read from the checkpoint's URL.
    #[arg(long, value_name = "FILE")]
    pub url_list: Option<PathBuf>,
}

/// Header values are secrets: only their names are shown.
impl std::fmt::Debug for HttpFlags {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self
            .headers
            .iter()
            .map(|h| h.split_once(':').map_or("<invalid>", |(n, _)| n.trim()))
            .collect();
        f.debug_struct("HttpFlags")
            .field("headers", &names)
            .field("ca_bundle", &self.ca_bundle)
            .field("url_list", &self.url_list)
            .finish()
    }
}

/// What to select.
#[derive(Debug, Clone, Args, Default)]
#[command(next_help_heading = "Selection")]
pub struct SelectFlags {
    /// Select entries whose fqn matches this glob (repeatable; `*` also matches dots), such as
    /// 'model.layers.*.attn.*'. Without --select or --spec regions, everything is selected.
    #[arg(
        long = "select",
        short = 's',
        visible_alias = "include",
        value_name = "GLOB"
    )]
    pub select: Vec<String>,
    /// Leave out entries whose fqn matches this glob (repeatable), such as 'optim.*'.
    #[arg(long = "exclude", short = 'x', value_name = "GLOB")]
    pub exclude: Vec<String>,
    /// A JSON selection spec: {"select": [...], "exclude": [...], "regions": [{"fqn", "offsets",
    /// "sizes"}]} (see docs/selection.md). Combined with --select and --exclude.
    #[arg(long, value_name = "FILE")]
    pub spec: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct LsArgs {
    /// The checkpoint: a folder, file://PATH, s3://BUCKET/PREFIX or https://HOST/PATH.
    #[arg(value_name = "CKPT")]
    pub checkpoint: Location,
    #[command(flatten)]
    pub selection: SelectFlags,
    /// Print one JSON document (schema in docs/output.md) instead of a table.
    #[arg(long, help_heading = "Output")]
    pub json: bool,
    #[command(flatten)]
    pub s3: S3Flags,
    #[command(flatten)]
    pub http: HttpFlags,
}

/// How ranges are grouped and split into requests.
#[derive(Debug, Clone, Copy, Args)]
#[command(next_help_heading = "Plan")]
pub struct PlanFlags {
    /// Join two ranges of a file into one range group when the gap between them is at most this
    /// (0 joins only adjacent ranges; inf joins the whole file). Accepts 0, 4096, 512KiB, 32MiB,
    /// 1GB, inf. 2MiB is about S3's first-byte latency times one connection's throughput: a
    /// smaller gap costs less to read than a request.
    #[arg(long, value_name = "SIZE", default_value = "2MiB")]
    pub max_gap_size: ByteSize,
    /// Split range groups into requests of at most this size.
    #[arg(long, value_name = "SIZE", default_value = "8MiB")]
    pub part_size: ByteSize,
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    /// The checkpoint: a folder, file://PATH, s3://BUCKET/PREFIX or https://HOST/PATH.
    #[arg(value_name = "CKPT")]
    pub checkpoint: Location,
    #[command(flatten)]
    pub selection: SelectFlags,
    #[command(flatten)]
    pub plan: PlanFlags,
    /// Print one JSON document (schema in docs/output.md) instead of a table.
    #[arg(long, help_heading = "Output")]
    pub json: bool,
    /// List every range group, not only the per-file summary.
    #[arg(long, help_heading = "Output")]
    pub groups: bool,
    /// Show the plan of share I of N (0-based) that `fetch --shard I/N` reads.
    #[arg(
        long,
        value_name = "I/N|auto",
        help_heading = "Shard",
        conflicts_with = "shards"
    )]
    pub shard: Option<ShardArg>,
    /// Show how the plan divides into N shares: files, items, requests and bytes of each.
    #[arg(long, value_name = "N", help_heading = "Shard", value_parser = clap::value_parser!(u32).range(1..))]
    pub shards: Option<u32>,
    #[command(flatten)]
    pub s3: S3Flags,
    #[command(flatten)]
    pub http: HttpFlags,
}

// `-o` is required unless `--dry-run` (which is refused with a hint), so the usage line says it.
#[derive(Debug, Args)]
#[command(override_usage = "dcpfetch fetch [OPTIONS] --output <DIR|-> <CKPT>")]
pub struct FetchArgs {
    /// The checkpoint: a folder, file://PATH, s3://BUCKET/PREFIX or https://HOST/PATH.
    #[arg(value_name = "CKPT")]
    pub checkpoint: Location,
    #[command(flatten)]
    pub selection: SelectFlags,
    /// Output folder (a sparse copy of the checkpoint), or - for stdout.
    #[arg(
        help_heading = "Output",
        short = 'o',
        long = "output",
        value_name = "DIR|-",
        required_unless_present = "dry_run"
    )]
    pub output: Option<PathBuf>,
    /// With -o -: raw bytes or a tar stream.
    #[arg(help_heading = "Output", long, value_enum, default_value_t = StreamFormat::Raw)]
    pub format: StreamFormat,
    /// With -o -: write a JSON manifest mapping every item to its offset in the stream.
    #[arg(long, value_name = "FILE", help_heading = "Output")]
    pub manifest: Option<PathBuf>,
    /// Continue an interrupted fetch into the same folder, fetching only what is missing (or add
    /// more items to an earlier fetch).
    #[arg(long, help_heading = "Output")]
    pub resume: bool,
    /// Write into a folder that holds something else (existing files named by the checkpoint are
    /// overwritten, per-rank `__N.metadata` files it does not have are removed; nothing else is
    /// touched).
    #[arg(long, help_heading = "Output")]
    pub force: bool,
    #[command(flatten)]
    pub plan: PlanFlags,
    #[command(flatten)]
    pub engine: EngineFlags,
    /// Print a JSON summary when done: on stdout, or on stderr with -o -.
    #[arg(long, help_heading = "Output")]
    pub json: bool,
    /// No progress bar and no warnings on stderr.
    #[arg(long, short = 'q', help_heading = "Output")]
    pub quiet: bool,
    /// No progress bar; unlike --quiet, warnings and the summary line are still printed.
    #[arg(long, help_heading = "Output")]
    pub no_progress: bool,
    /// Only share I of N (0-based), so that N workers with I = 0 .. N-1 together do the work
    /// once; `auto` takes I and N from Slurm, torchrun or Open MPI, `auto/N` also from a
    /// Kubernetes Indexed Job (docs/usage.md).
    #[arg(long, value_name = "I/N|auto", help_heading = "Shard")]
    pub shard: Option<ShardArg>,
    /// Refused with a pointer to `dcpfetch plan`, which shows what a fetch would read (hidden:
    /// for people used to `aws s3 cp --dryrun`; docs/usage.md).
    #[arg(long = "dry-run", alias = "dryrun", hide = true)]
    pub dry_run: bool,
    #[command(flatten)]
    pub s3: S3Flags,
    #[command(flatten)]
    pub http: HttpFlags,
}

#[derive(Debug, Args)]
#[command(override_usage = "dcpfetch export [OPTIONS] --output <FILE|DIR|-> <CKPT>")]
pub struct ExportArgs {
    /// The checkpoint: a folder, file://PATH, s3://BUCKET/PREFIX or https://HOST/PATH.
    #[arg(value_name = "CKPT")]
    pub checkpoint: Location,
    #[command(flatten)]
    pub selection: SelectFlags,
    /// Output file (`model.safetensors`, `w.npy`), a folder with --max-shard-size, or - for
    /// stdout. Written under a temporary name and renamed once complete.
    #[arg(
        help_heading = "Output",
        short = 'o',
        long = "output",
        value_name = "FILE|DIR|-"
    )]
    pub output: PathBuf,
    /// File format: safetensors, or npy for one tensor.
    #[arg(help_heading = "Output", long, value_enum, default_value_t = ExportFormat::Safetensors)]
    pub format: ExportFormat,
    /// Files of at most SIZE of tensor data: -o is then a folder in the Hugging Face layout
    /// (model-00001-of-0000N.safetensors and model.safetensors.index.json).
    #[arg(help_heading = "Output", long, value_name = "SIZE")]
    pub max_shard_size: Option<ByteSize>,
    /// Remove PREFIX from the start of every tensor name that has it (`model.`).
    #[arg(help_heading = "Output", long, value_name = "PREFIX")]
    pub strip_prefix: Option<String>,
    /// A name starting with FROM starts with TO instead (repeatable; the first that applies,
    /// after --strip-prefix).
    #[arg(help_heading = "Output", long, value_name = "FROM=TO")]
    pub rename: Vec<String>,
    /// Leave out (and list) tensors whose dtype the format cannot hold, instead of failing.
    #[arg(help_heading = "Output", long)]
    pub skip_unsupported: bool,
    /// Replace an existing output file (or an earlier export in the folder).
    #[arg(long, help_heading = "Output")]
    pub force: bool,
    #[command(flatten)]
    pub plan: PlanFlags,
    #[command(flatten)]
    pub engine: EngineFlags,
    /// Print a JSON summary when done: on stdout, or on stderr with -o -.
    #[arg(long, help_heading = "Output")]
    pub json: bool,
    /// No progress bar and no warnings on stderr.
    #[arg(long, short = 'q', help_heading = "Output")]
    pub quiet: bool,
    /// No progress bar; unlike --quiet, warnings and the summary line are still printed.
    #[arg(long, help_heading = "Output")]
    pub no_progress: bool,
    #[command(flatten)]
    pub s3: S3Flags,
    #[command(flatten)]
    pub http: HttpFlags,
}

/// Requests in flight unless `--concurrency` says otherwise (also the HEADs of `plan`).
pub const DEFAULT_CONCURRENCY: u32 = 32;

/// How hard the fetch engine pushes.
#[derive(Debug, Clone, Copy, Args)]
#[command(next_help_heading = "Engine")]
pub struct EngineFlags {
    /// Requests in flight at once (32: at S3's ~30 ms first byte and ~90 MB/s per connection,
    /// 1.6x the throughput of 16; docs/performance.md).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_CONCURRENCY, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub concurrency: u32,
    #[command(flatten)]
    pub memory: MemoryFlag,
}

/// The memory budget of a run: the same flag for fetch, verify and each run of bench.
#[derive(Debug, Clone, Copy, Args)]
pub struct MemoryFlag {
    /// Most bytes of parts waiting for their turn where bytes must be written in order (-o -,
    /// verify's hashes); at least --part-size. A fetch into a folder writes bodies as they arrive
    /// and holds only a few MiB whatever this is.
    #[arg(long, value_name = "SIZE", default_value = "256MiB")]
    pub max_memory: ByteSize,
}

// The checkpoint is required unless --combine, so the usage lines say both.
#[derive(Debug, Args)]
#[command(
    override_usage = "dcpfetch verify [OPTIONS] <CKPT>\n       dcpfetch verify [--json] --combine <REPORT.json>..."
)]
pub struct VerifyArgs {
    /// The checkpoint: a folder, file://PATH, s3://BUCKET/PREFIX or https://HOST/PATH.
    #[arg(value_name = "CKPT", required_unless_present = "combine")]
    pub checkpoint: Option<Location>,
    #[command(flatten)]
    pub selection: SelectFlags,
    /// Metadata and sizes only (HEAD/stat, no item bytes).
    #[arg(long, help_heading = "Checks")]
    pub quick: bool,
    /// A sha256 manifest of every shard file ({"algorithm": "sha256", "files": {name: hex}}, the
    /// integrity.json layout Megatron-Core uses): compared when FILE exists, written when not.
    /// Reads every byte of every shard file.
    #[arg(long, value_name = "FILE", help_heading = "Checks")]
    pub manifest: Option<PathBuf>,
    /// Only share I of N (0-based), so that N workers with I = 0 .. N-1 together check every item
    /// once; `auto` takes I and N from Slurm, torchrun or Open MPI, `auto/N` also from a
    /// Kubernetes Indexed Job (docs/usage.md).
    #[arg(long, value_name = "I/N|auto", help_heading = "Shard")]
    pub shard: Option<ShardArg>,
    /// Combine the `--json` reports of `verify --shard I/N` (one per share, all N of them) into
    /// one verdict, with the exit code a single run would have.
    #[arg(long, value_name = "REPORT.json", num_args = 1.., help_heading = "Shard", conflicts_with_all = ["checkpoint", "shard", "manifest", "quick"])]
    pub combine: Vec<PathBuf>,
    /// Print one JSON document (schema in docs/output.md) instead of the report.
    #[arg(long, help_heading = "Output")]
    pub json: bool,
    /// No progress bar.
    #[arg(long, short = 'q', help_heading = "Output")]
    pub quiet: bool,
    /// No progress bar (what --quiet does here too).
    #[arg(long, help_heading = "Output")]
    pub no_progress: bool,
    #[command(flatten)]
    pub plan: PlanFlags,
    #[command(flatten)]
    pub engine: EngineFlags,
    #[command(flatten)]
    pub s3: S3Flags,
    #[command(flatten)]
    pub http: HttpFlags,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// The checkpoint: a folder, file://PATH, s3://BUCKET/PREFIX or https://HOST/PATH.
    #[arg(value_name = "CKPT")]
    pub checkpoint: Location,
    #[command(flatten)]
    pub selection: SelectFlags,
    /// Gap sizes to try (comma-separated).
    #[arg(
        long,
        value_name = "SIZES",
        value_delimiter = ',',
        default_value = "0,1MiB,8MiB,32MiB,inf",
        help_heading = "Sweep"
    )]
    pub gap_sizes: Vec<ByteSize>,
    /// Concurrency levels to try (comma-separated).
    #[arg(
        long,
        value_name = "NS",
        value_delimiter = ',',
        default_value = "32",
        help_heading = "Sweep"
    )]
    pub concurrency: Vec<u32>,
    /// Part sizes to try (comma-separated).
    #[arg(
        long,
        value_name = "SIZES",
        value_delimiter = ',',
        default_value = "8MiB",
        help_heading = "Sweep"
    )]
    pub part_sizes: Vec<ByteSize>,
    /// Runs of every setting (the report gives the median and the spread).
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000), help_heading = "Sweep")]
    pub repeat: u32,
    /// Fetch into this folder instead of a null sink: a new or empty one, which each run then
    /// overwrites (a folder holding anything else is refused).
    #[arg(
        short = 'o',
        long = "output",
        value_name = "DIR",
        help_heading = "Sweep"
    )]
    pub output: Option<PathBuf>,
    #[command(flatten, next_help_heading = "Sweep")]
    pub memory: MemoryFlag,
    /// Print one JSON document (schema in docs/output.md) instead of the table.
    #[arg(long, help_heading = "Output", conflicts_with = "csv")]
    pub json: bool,
    /// Print CSV instead of the table.
    #[arg(long, help_heading = "Output")]
    pub csv: bool,
    /// Also draw time and bytes transferred against gap size, a line per concurrency and part
    /// size, into this SVG file (its name must end in .svg).
    #[arg(long, value_name = "FILE.svg", help_heading = "Output")]
    pub plot: Option<PathBuf>,
    /// No progress bar.
    #[arg(long, short = 'q', help_heading = "Output")]
    pub quiet: bool,
    /// No progress bar (what --quiet does here too).
    #[arg(long, help_heading = "Output")]
    pub no_progress: bool,
    #[command(flatten)]
    pub s3: S3Flags,
    #[command(flatten)]
    pub http: HttpFlags,
}
