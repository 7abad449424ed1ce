"""The ``dsstream`` command line.  argparse lives only here and maps onto config dataclasses."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from dsstream import __version__
from dsstream.protocol import Ended, Error, Final, Partial, ServerEvent, encode_event

__all__ = ["main", "build_parser", "positive_int"]

EXIT_UNAVAILABLE = 2  # model not installed, server refused, bad input


def _hotword(text: str) -> dict[str, Any]:
    phrase, sep, boost = text.rpartition(":")
    if sep and phrase:
        try:
            return {"phrase": phrase, "boost": float(boost)}
        except ValueError:
            pass
    return {"phrase": text}


def positive_int(text: str) -> int:
    """An argparse ``type``: a whole number >= 1, else the usage message says why."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _min_max(text: str) -> tuple[int, int]:
    """An argparse ``type``: ``MIN..MAX``, two whole numbers, 0 <= MIN <= MAX, MAX >= 1."""
    low, sep, high = text.partition("..")
    try:
        pair = (int(low), int(high))
    except ValueError:
        pair = None
    if not sep or pair is None or not 0 <= pair[0] <= pair[1] or pair[1] < 1:
        raise argparse.ArgumentTypeError(f"expected MIN..MAX (e.g. 1..4), got {text!r}")
    return pair


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


# Longer than our ~60-line bound: a flat list of every subcommand's options, one
# declaration each; splitting it would only scatter the CLI's reference.
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsstream", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the WebSocket streaming server")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8765)
    serve.add_argument("--token", help="require this bearer token (header or ?token=)")
    serve.add_argument(
        "--origin", action="append", default=[], metavar="ORIGIN",
        help="a browser origin allowed beside this server's own and loopback ones "
        "(repeatable; '*' allows any web page to open sessions)",
    )  # fmt: skip
    serve.add_argument(
        "--metrics-public", action="store_true",
        help="with --token: serve /metrics without the token",
    )  # fmt: skip
    serve.add_argument("--max-sessions", type=int, default=128)
    serve.add_argument("--max-frame-bytes", type=int, default=1 << 20)
    serve.add_argument(
        "--max-upload-mb", type=positive_int, default=200,
        help="largest file POST /v1/audio/transcriptions takes (OpenAI-compatible API)",
    )  # fmt: skip
    serve.add_argument("--idle-timeout", type=float, default=30.0, help="seconds")
    serve.add_argument("--max-session", type=float, default=3600.0, help="seconds")
    serve.add_argument("--threads", type=positive_int, default=64, help="pipeline worker threads")
    serve.add_argument("--samples", type=Path, help="folder of the sample models")
    serve.add_argument(
        "--beam", type=positive_int,
        help="ASR decoder beam (default: the model's tuned one; narrower serves more streams)",
    )  # fmt: skip
    serve.add_argument(
        "--decoder-mode", choices=("free", "lexicon"),
        help="ASR sessions' default search (default: the model's, chosen by measurement): "
             "lexicon emits only words of the LM's vocabulary, free any spelling",
    )  # fmt: skip
    serve.add_argument(
        "--batch-delay-ms", type=_non_negative_float,
        help="longest an ASR stream's encoder step waits for others to batch with "
             "(default: AsrConfig's; longer batches more, cheaper, later partials)",
    )  # fmt: skip
    serve.add_argument(
        "--engine-threads", type=positive_int,
        help="ONNX Runtime threads per forward pass (default 1: the server's streams "
             "keep the cores busy; more suits few streams on many cores)",
    )  # fmt: skip
    serve.add_argument(
        "--workers", type=positive_int, default=1,
        help="server processes on the port (one process uses about 1.4 cores: "
             "the GIL; more serve more streams where there are more cores)",
    )  # fmt: skip
    serve.add_argument(
        "--drain-timeout", type=_non_negative_float, default=600.0,
        help="seconds a worker replaced by a reload (SIGHUP with --workers) lets its "
             "open sessions go on before it finalizes them",
    )  # fmt: skip
    serve.add_argument("--log-level", default="INFO")
    serve.add_argument("--log-format", choices=["text", "json"], default="text")
    serve.add_argument(
        "--ray", action="store_true",
        help="deploy on Ray Serve (pip install 'dsstream[ray]'; docs/deploy.md): replicas "
             "behind Serve's proxy on --host/--port; a private local cluster unless "
             "--ray-address",
    )  # fmt: skip
    serve.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="deploy on the Ray cluster whose head is ADDR (implies --ray)",
    )
    scale = serve.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=positive_int, default=1, help="with --ray")
    scale.add_argument(
        "--autoscale", type=_min_max, metavar="MIN..MAX",
        help="with --ray: as many replicas as open sessions need (see --target-sessions)",
    )  # fmt: skip
    serve.add_argument(
        "--target-sessions", type=float, default=32.0,
        help="with --autoscale: open sessions per replica the autoscaler aims at",
    )  # fmt: skip
    serve.add_argument("--cpus-per-replica", type=float, default=1.0, help="with --ray")

    tr = sub.add_parser("transcribe", help="transcribe an audio file")
    tr.add_argument("file", type=Path)
    tr.add_argument("--server", help="ws:// URL; without it, run in this process")
    tr.add_argument("--token")
    tr.add_argument("--realtime", action="store_true", help="send at the pace of the audio")
    tr.add_argument("--chunk-ms", type=float, default=100.0)
    _add_asr_flags(tr)
    tr.add_argument("--json", action="store_true", help="print every event as a JSON line")
    tr.add_argument("--captions", choices=("srt", "vtt"),
                    help="print subtitles timed by the words, once the file is done")  # fmt: skip
    tr.add_argument("--samples", type=Path, help="folder of the sample models (in-process)")

    batch = sub.add_parser(
        "transcribe-batch", help="transcribe many files into JSON lines (resumable)",
        description="Transcribe files, folders, globs or manifests (.txt/.lst/.list/.tsv: "
        "one path per line) into OUT/transcripts.jsonl, one record per file; files "
        "already there are skipped, so a rerun resumes.",
    )  # fmt: skip
    batch.add_argument("inputs", nargs="+", help="files, folders, glob patterns, manifests")
    batch.add_argument("-o", "--out", type=Path, required=True, help="output folder")
    batch.add_argument("--jobs", type=positive_int, default=1,
                       help="processes, each loading the models once (without --ray)")  # fmt: skip
    batch.add_argument("--ray", action="store_true",
                       help="run on Ray Data, on a private local cluster (pip install "
                            "'dsstream[ray]')")  # fmt: skip
    batch.add_argument("--ray-address", metavar="ADDR",
                       help="run on the Ray cluster whose head is ADDR (HOST:PORT)")  # fmt: skip
    batch.add_argument("--actors", type=positive_int, default=1,
                       help="Ray actors recognizing (one set of models each)")  # fmt: skip
    batch.add_argument("--cpus-per-actor", type=float, default=1.0)
    batch.add_argument("--srt", action="store_true", help="also OUT/captions/<file>.srt")
    batch.add_argument("--vtt", action="store_true", help="also OUT/captions/<file>.vtt")
    batch.add_argument("--max-seconds", type=float, default=4 * 3600.0,
                       help="longer files are recorded as too_long")  # fmt: skip
    batch.add_argument("--retry-errors", action="store_true",
                       help="also redo files whose record is an error")  # fmt: skip
    batch.add_argument("--no-progress", action="store_true")
    batch.add_argument("--samples", type=Path, help="folder of the sample models")
    _add_asr_flags(batch)

    ask = sub.add_parser("ask", help="ask a question about an image")
    ask.add_argument("image", type=Path)
    ask.add_argument("question")
    ask.add_argument("--server", help="ws:// URL; without it, run in this process")
    ask.add_argument("--token")
    ask.add_argument("--json", action="store_true")
    ask.add_argument("--samples", type=Path)

    lm = sub.add_parser("lm", help="language model tools")
    lm_sub = lm.add_subparsers(dest="lm_command", required=True)
    build = lm_sub.add_parser("build", help="estimate a Kneser-Ney n-gram LM (ARPA)")
    build.add_argument("corpus", nargs="+", type=Path, help="text files")
    build.add_argument("-o", "--output", type=Path, required=True, help="ARPA file to write")
    build.add_argument("--order", type=int, default=3, choices=range(1, 10), metavar="N")
    build.add_argument(
        "--prune", type=int, nargs="+", default=[], metavar="K",
        help="per order, drop n-grams with adjusted count <= K (e.g. 0 0 1)",
    )  # fmt: skip
    build.add_argument(
        "--one-per-line", action="store_true", help="one sentence per line (else prose)"
    )
    build.add_argument("--exclude", type=Path, help="file of sentences to leave out")
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    binary = lm_sub.add_parser(
        "binary", help="an ARPA LM in KenLM's binary format (loads in ms; same scores)"
    )
    binary.add_argument("arpa", type=Path)
    binary.add_argument("-o", "--output", type=Path, required=True, help="binary file to write")
    binary.add_argument(
        "--build-binary", default="build_binary", metavar="PATH",
        help="KenLM's build_binary tool (see dsstream.lm.binary for how to compile it)",
    )  # fmt: skip

    sub.add_parser("version", help="print the version")
    return parser


def _lm(args: argparse.Namespace) -> int:
    from dsstream.lm import build_arpa, read_corpus

    if args.lm_command == "binary":
        from dsstream.lm.binary import vocab_sidecar, write_binary

        write_binary(args.arpa, args.output, args.build_binary)
        print(f"wrote {args.output} and {vocab_sidecar(args.output)}")
        return 0

    exclude = list(read_corpus(args.exclude, one_per_line=True)) if args.exclude else []
    model = build_arpa(
        args.corpus,
        args.output,
        order=args.order,
        prune_thresholds=args.prune,
        one_per_line=args.one_per_line,
        exclude=exclude,
        progress=not args.quiet,
    )
    sizes = ", ".join(f"{n}-grams: {len(t)}" for n, t in enumerate(model.probs, 1))
    print(f"wrote {args.output} ({sizes})")
    return 0


# -- serve -------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from dsstream.logs import configure_logging
    from dsstream.pipelines.base import PipelineRegistry
    from dsstream.pipelines.defaults import default_registry, preload
    from dsstream.protocol import Limits
    from dsstream.server import ServerConfig, run_server, server_urls
    from dsstream.workers import WorkerInfo, supervise

    configure_logging(args.log_level, args.log_format)
    limits = Limits(
        max_frame_bytes=args.max_frame_bytes,
        max_session_s=args.max_session,
        idle_timeout_s=args.idle_timeout,
    )
    config = ServerConfig(
        host=args.host,
        port=args.port,
        limits=limits,
        max_sessions=args.max_sessions,
        token=args.token,
        allowed_origins=tuple(args.origin),
        metrics_public=args.metrics_public,
        worker_threads=args.threads,
        drain_timeout_s=args.drain_timeout,
        max_upload_bytes=args.max_upload_mb << 20,
    )

    registry_args = {
        "samples_dir": args.samples, "beam_width": args.beam,
        "batch_delay_ms": args.batch_delay_ms, "engine_threads": args.engine_threads,
        "decoder_mode": args.decoder_mode,
    }  # fmt: skip
    if args.ray or args.ray_address:
        return _serve_ray(args, config, registry_args)

    def registry() -> PipelineRegistry:  # again at each reload: the files as they are then
        return default_registry(**registry_args)

    def serve(config: ServerConfig) -> int:
        asyncio.run(run_server(registry(), config, rebuild=registry))
        return 0

    if args.workers == 1:
        return serve(config)

    def worker(info: WorkerInfo, fd: int) -> int:
        return serve(replace(config, listen_fd=fd, worker=info))

    def announce(port: int) -> None:
        url, page = server_urls(args.host, port, config.path)
        print(f"dsstream {__version__} serving {url} ({args.workers} worker processes)",
              flush=True)  # fmt: skip
        print(f"demo page: {page}", flush=True)
        if config.vosk_path:
            print(f"Vosk-compatible endpoint: {server_urls(args.host, port, config.vosk_path)[0]}",
                  flush=True)  # fmt: skip

    return supervise(
        worker, args.workers, args.host, args.port, announce, lambda: preload(args.samples)
    )


def _serve_ray(args: argparse.Namespace, config: Any, registry_args: dict[str, Any]) -> int:
    """``serve --ray``: deploy on Ray Serve, then wait for SIGINT/SIGTERM and take
    the application down (a private cluster goes with this process)."""
    import signal
    import threading

    from dsstream.ray_cluster import connect
    from dsstream.serve_ray import ServeSettings, deploy

    if args.workers != 1:
        raise ValueError("--workers is the single-machine server's; on Ray use --replicas")
    settings = ServeSettings(
        replicas=args.replicas, autoscale=args.autoscale, target_sessions=args.target_sessions,
        drain_timeout_s=args.drain_timeout, cpus_per_replica=args.cpus_per_replica,
        host=args.host, port=args.port,
        # One node (a private cluster): one proxy.  A cluster: one per node.
        proxy_location="HeadOnly" if args.ray_address is None else "EveryNode",
    )  # fmt: skip
    connect(args.ray_address)
    url = deploy(config, settings, registry_args)
    print(f"dsstream {__version__} serving {url} on Ray Serve", flush=True)
    print(f"demo page: {url.rsplit('/', 2)[0].replace('ws://', 'http://')}/", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    from ray import serve

    print("shutting down: draining the replicas", flush=True)
    serve.shutdown()
    return 0


def _add_asr_flags(parser: argparse.ArgumentParser) -> None:
    """The recognition options ``transcribe`` and ``transcribe-batch`` share."""
    parser.add_argument("--hotword", action="append", default=[], help="PHRASE or PHRASE:BOOST")
    parser.add_argument(
        "--grammar", action="append", default=[], metavar="PHRASE",
        help="recognize only these phrases (repeat it; '[unk]' reports other speech as such)",
    )  # fmt: skip
    parser.add_argument(
        "--grammar-sequence", action="store_true",
        help="a result may be several grammar phrases in a row (digits, codes)",
    )  # fmt: skip
    parser.add_argument("--nbest", type=int, default=1)
    parser.add_argument("--decoder-mode", choices=("free", "lexicon"),
                        help="lexicon: only words of the LM's vocabulary; free: any spelling "
                             "(default: the model's)")  # fmt: skip
    parser.add_argument("--split-channels", action="store_true",
                        help="recognize each channel of a stereo file on its own (a call's "
                             "two parties)")  # fmt: skip
    parser.add_argument("--no-endpointing", action="store_true")
    parser.add_argument(
        "--punctuate", action=argparse.BooleanOptionalAction, default=None,
        help="marks and capitals in the text (default: on for captions, else off)",
    )  # fmt: skip


# -- transcribe -------------------------------------------------------------------


class _Printer:
    """Partials on one updating line (on a terminal), finals as lines; or the
    events as JSON lines; or, with ``captions``, subtitles at the end."""

    def __init__(self, as_json: bool, captions: str | None = None) -> None:
        self.as_json = as_json
        self.captions = captions
        self.finals: list[Final] = []
        self.tty = sys.stdout.isatty()
        self.partial_shown = False

    def __call__(self, event: ServerEvent) -> None:
        if self.as_json:
            print(encode_event(event), flush=True)
        elif self.captions is not None:
            if isinstance(event, Final):
                self.finals.append(event)
            elif isinstance(event, Error):
                print(f"error: {event.code.value}: {event.message}", file=sys.stderr, flush=True)
        elif isinstance(event, Partial):
            if self.tty:
                print(f"\r\x1b[K{event.text}", end="", flush=True)
                self.partial_shown = True
        elif isinstance(event, Final):
            if self.partial_shown:
                print("\r\x1b[K", end="")
                self.partial_shown = False
            if event.text:
                label = f"[{event.channel}] " if event.channel is not None else ""
                print(f"{label}{event.text}", flush=True)
        elif isinstance(event, Error):
            print(f"error: {event.code.value}: {event.message}", file=sys.stderr, flush=True)


def _asr_options(args: argparse.Namespace, captions: bool = False) -> dict[str, Any]:
    """A start message's options from the flags; ``captions``: subtitles are
    written, which are punctuated unless ``--no-punctuate``."""
    options: dict[str, Any] = {"nbest": args.nbest}
    # A grammar's finals are its phrases as given: captions of them stay so.
    punctuate = captions and not args.grammar if args.punctuate is None else args.punctuate
    if punctuate:
        options["punctuate"] = True
    if args.decoder_mode:
        options["decoder_mode"] = args.decoder_mode
    if args.hotword:
        options["hotwords"] = [_hotword(h) for h in args.hotword]
    if args.grammar:
        options["grammar"] = list(args.grammar)
        options["grammar_sequence"] = args.grammar_sequence
    if args.no_endpointing:
        options["endpointing"] = False
    if args.split_channels:
        options["split_channels"] = True
    return options


async def _transcribe_remote(args: argparse.Namespace, show: _Printer) -> int:
    from dsstream.audio import load_audio
    from dsstream.client import Client

    # A bad file fails before any connection is made.
    audio = load_audio(args.file, mono=not args.split_channels)
    status = 0
    async with Client(args.server, args.token) as client:
        async for event in client.transcribe(
            audio,
            chunk_ms=args.chunk_ms,
            realtime=args.realtime,
            **_asr_options(args, args.captions is not None),
        ):
            show(event)
            if isinstance(event, Error) and event.fatal:
                status = EXIT_UNAVAILABLE
    return status


def _transcribe_local(args: argparse.Namespace, show: _Printer) -> int:
    from dsstream.audio import channel_options, iter_chunks, load_audio
    from dsstream.local import LocalSession
    from dsstream.pipelines.defaults import default_registry

    samples, rate = load_audio(args.file, mono=not args.split_channels)
    registry = default_registry(args.samples)
    options = channel_options(samples, _asr_options(args, args.captions is not None))
    with LocalSession("asr", registry, sample_rate=rate, **options) as session:
        for chunk in iter_chunks(samples, rate, args.chunk_ms):
            for event in session.send_audio(chunk):
                show(event)
        for event in session.end():
            show(event)
    return 0


def _transcribe(args: argparse.Namespace) -> int:
    from dsstream.captions import to_srt, to_vtt

    show = _Printer(args.json, args.captions)
    if args.server:
        status = asyncio.run(_transcribe_remote(args, show))
    else:
        status = _transcribe_local(args, show)
    if args.captions is not None:
        print((to_srt if args.captions == "srt" else to_vtt)(show.finals), end="", flush=True)
    return status


# -- transcribe-batch ---------------------------------------------------------------


def _transcribe_batch(args: argparse.Namespace) -> int:
    from dsstream.batch import BatchConfig, Output, collect_inputs, common_root, pending

    if args.ray_address and args.jobs > 1:
        raise ValueError("--jobs is the local pool's; on Ray use --actors")
    use_ray = args.ray or args.ray_address is not None
    captions = tuple(fmt for fmt, on in (("srt", args.srt), ("vtt", args.vtt)) if on)
    config = BatchConfig(
        options=_asr_options(args, bool(captions)), captions=captions,
        max_seconds=args.max_seconds,
        samples_dir=str(args.samples) if args.samples else None,
    )  # fmt: skip
    paths = collect_inputs(args.inputs)
    with Output(args.out, common_root(paths)) as output:
        todo = pending(paths, output.done(), retry_errors=args.retry_errors)
        show = _BatchProgress(len(todo), enabled=not args.no_progress)
        try:
            if use_ray and todo:
                from dsstream.batch_ray import run_ray
                from dsstream.ray_cluster import connect

                connect(args.ray_address)
                summary = run_ray(todo, output, config, args.actors, args.cpus_per_actor, show)
            else:
                from dsstream.batch import run_local

                summary = run_local(todo, output, config, args.jobs, show)
        finally:
            show.close()
    summary.skipped = len(paths) - len(todo)
    print(f"{summary.line()}; records in {output.ledger}", file=sys.stderr)
    return 1 if summary.failed else 0


class _BatchProgress:
    """A progress bar over files with the audio hours done and the x real-time so far
    (tqdm's ETA follows the files' pace); a failed file's error on its own line."""

    def __init__(self, total: int, enabled: bool) -> None:
        from tqdm import tqdm

        from dsstream.batch import duration_text

        self.text = duration_text
        self.bar = tqdm(total=total, unit="file", disable=not enabled or total == 0,
                        dynamic_ncols=True)  # fmt: skip

    def __call__(self, result: Any, summary: Any) -> None:
        if result.failed:
            error = result.record["error"]
            self.bar.write(f"error: {error['code']}: {error['message']}", file=sys.stderr)
        self.bar.set_postfix(audio=self.text(summary.audio_seconds),
                             speed=f"{summary.x_realtime:.1f}x")  # fmt: skip
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


# -- ask ---------------------------------------------------------------------------


async def _ask_remote(args: argparse.Namespace) -> Any:
    from dsstream.client import Client

    image = args.image.read_bytes()
    async with Client(args.server, args.token) as client:
        await client.start("vqa")
        await client.send_image(image)
        answer = await client.ask(args.question)
        await client.end()
        async for event in client.events():
            if isinstance(event, Ended):
                break
        return answer


def _ask(args: argparse.Namespace) -> int:
    if args.server:
        answer = asyncio.run(_ask_remote(args))
    else:
        from dsstream.local import LocalSession
        from dsstream.pipelines.defaults import default_registry

        with LocalSession("vqa", default_registry(args.samples)) as session:
            session.send_image(args.image)
            answer = session.ask(args.question)
    if args.json:
        print(json.dumps(asdict(answer)))
    else:
        print(f"{answer.text}  (score {answer.score:.2f}, {answer.latency_ms:.0f} ms)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "version":
        print(f"dsstream {__version__}")
        return 0
    handlers = {
        "serve": _serve, "transcribe": _transcribe, "transcribe-batch": _transcribe_batch,
        "ask": _ask, "lm": _lm,
    }  # fmt: skip
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one clear line for the user, not a traceback
        from dsstream.client import ServerError
        from dsstream.pipelines.base import ModelUnavailable, PipelineError
        from engine.extras import MissingExtra

        clear = (ModelUnavailable, PipelineError, ServerError, MissingExtra, ValueError, OSError)
        if isinstance(exc, clear):
            print(f"dsstream {args.command}: {exc}", file=sys.stderr)
            return EXIT_UNAVAILABLE
        raise


if __name__ == "__main__":
    sys.exit(main())
