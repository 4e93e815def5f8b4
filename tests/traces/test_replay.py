import asyncio
import json

import pytest

from lenserve.traces.fake_server import FakeOpenAIServer, FakeServerConfig, fake_tokenize
from lenserve.traces.plots import PLOT_FILES
from lenserve.traces.replay import ReplayConfig, Replayer, replay
from lenserve.traces.sse_client import HTTPStatusError, SSEClient
from lenserve.traces.synth import LengthDist, SynthConfig, synthesize
from lenserve.traces.trace import Trace, TraceRequest


def small_trace(num_requests=30, rate=40.0, seed=0):
    return synthesize(
        SynthConfig(
            num_requests=num_requests,
            gamma_shape=1.0,
            gamma_scale=1.0 / rate,
            prompt=LengthDist("lognormal", mu=4.0, sigma=1.0, max_tokens=600),
            output=LengthDist("lognormal", mu=2.0, sigma=0.6, max_tokens=24),
            seed=seed,
        )
    )


@pytest.mark.timeout(120)
def test_exact_replay_writes_report_plots_and_records(fake_server, tmp_path):
    trace = small_trace()
    out = tmp_path / "run"
    report = replay(trace, ReplayConfig(url=fake_server.url, show_progress=False, metrics_interval_s=0.1, time_scale=2.0), out)

    for name in ("report.json", "report.md", "requests.jsonl", "metrics.jsonl", *PLOT_FILES):
        assert (out / name).stat().st_size > 0, name
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    for key in ("num_requests", "num_completed", "num_failed", "failures_by_status", "throughput_req_s", "throughput_tok_s", "goodput_req_s"):
        assert key in report
    for key in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        assert set(report[key]) == {"mean", "p50", "p90", "p99"}
    assert set(report["send_lag_s"]) >= {"p50", "p99"}
    assert report["num_requests"] == report["num_completed"] == 30 and report["num_failed"] == 0
    assert (out / "latency_cdf.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    records = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    c = trace.columns
    for r in records:
        i = r["index"]
        # exact mode: prompt of the trace's token count, max_tokens = response tokens, all generated
        assert r["prompt_tokens"] == r["prompt_tokens_server"] == c.prompt_tokens[i]
        assert r["max_tokens"] == r["output_tokens"] == c.output_tokens[i]
        assert r["scheduled_s"] == pytest.approx((c.arrival_s[i] - c.arrival_s[0]) / 2.0)
        assert r["sent_s"] >= r["scheduled_s"] and r["send_lag_s"] == pytest.approx(r["sent_s"] - r["scheduled_s"])
        assert len(r["itl_s"]) == r["output_tokens"] - 1 and r["ttft_s"] <= r["e2e_s"]
        assert r["status"] == 200 and r["finish_reason"] == "length"
    assert report["num_prompt_tokens_mismatched"] == 0
    samples = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert samples and all(s["kv_cache_usage_perc"] is not None for s in samples)
    assert "![throughput](throughput.png)" in (out / "report.md").read_text()


@pytest.mark.timeout(60)
def test_open_loop_sends_on_time_while_earlier_requests_are_in_flight(tmp_path):
    # Responses take ~0.7 s, requests arrive every 20 ms: a closed loop would fall behind.
    server = FakeOpenAIServer(FakeServerConfig(ttft_s=0.5, itl_s=0.05)).start_in_thread()
    try:
        trace = Trace([TraceRequest(0.02 * i, 20, 5) for i in range(25)])
        replayer = Replayer(trace, ReplayConfig(url=server.url, show_progress=False, metrics_interval_s=0))
        asyncio.run(replayer.run())
    finally:
        server.stop_thread()
    records = replayer.records
    assert all(r.ok for r in records)
    last_send = max(r.sent_s for r in records)
    first_end = min(r.end_s for r in records)
    assert last_send < first_end  # every request went out before the first answer came back
    assert max(r.send_lag_s for r in records) < 0.25


@pytest.mark.timeout(60)
def test_failures_are_recorded_by_status(tmp_path):
    server = FakeOpenAIServer(FakeServerConfig(ttft_s=0.001, itl_s=0.001, fail_every=4)).start_in_thread()
    try:
        trace = Trace([TraceRequest(0.01 * i, 20, 3) for i in range(12)])
        replayer = Replayer(trace, ReplayConfig(url=server.url, show_progress=False, metrics_interval_s=0))
        asyncio.run(replayer.run())
    finally:
        server.stop_thread()
    failed = [r for r in replayer.records if not r.ok]
    assert len(failed) == 3 and {r.status for r in failed} == {500}
    assert all("injected failure" in r.error for r in failed)


@pytest.mark.timeout(60)
def test_natural_mode_uses_chat_and_lets_the_model_stop(fake_server, tmp_path):
    trace = small_trace(num_requests=8, rate=100.0)
    replayer = Replayer(trace, ReplayConfig(url=fake_server.url, mode="natural", max_tokens_cap=100, show_progress=False, metrics_interval_s=0))
    asyncio.run(replayer.run())
    assert replayer.config.endpoint == "chat"
    assert all(r.ok and r.max_tokens == 100 and r.finish_reason == "stop" for r in replayer.records)
    assert all(5 <= r.output_tokens <= 44 for r in replayer.records)  # the fake model's own lengths


@pytest.mark.timeout(60)
def test_unreachable_server_is_a_clear_error(tmp_path):
    from lenserve.server.process import free_port

    trace = Trace([TraceRequest(0.0, 5, 5)])
    with pytest.raises(Exception, match="v1/models"):
        replay(trace, ReplayConfig(url=f"http://127.0.0.1:{free_port()}", show_progress=False), tmp_path)


# -- the SSE client against awkward framing ---------------------------------------------------------


async def _serve_once(response: bytes, piece: int):
    async def handle(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        for i in range(0, len(response), piece):  # dribble the bytes out
            writer.write(response[i : i + piece])
            await writer.drain()
            await asyncio.sleep(0)
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def _chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


@pytest.mark.parametrize("piece", [1, 7, 4096])
def test_sse_client_reassembles_events_split_anywhere(piece):
    body = _chunked(b"data: {\"a\": 1}\r\n\r\ndata: {\"b\"", b": 2}\n\n: comment\n\ndata: line1\ndata: line2\n\n", b"data: [DONE]\n\n")
    response = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n" + body

    async def main():
        server = await _serve_once(response, piece)
        client = SSEClient(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
        events = [e async for e in client.stream("/v1/completions", {"x": 1})]
        server.close()
        await client.aclose()
        return events

    assert asyncio.run(main()) == ['{"a": 1}', '{"b": 2}', "line1\nline2", "[DONE]"]


def test_sse_client_raises_on_error_status():
    response = b'HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: 20\r\n\r\n{"error": "too long"}'[:-1]

    async def main():
        server = await _serve_once(response, 5)
        client = SSEClient(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
        try:
            async for _ in client.stream("/v1/completions", {}):
                pass
        finally:
            server.close()
            await client.aclose()

    with pytest.raises(HTTPStatusError) as e:
        asyncio.run(main())
    assert e.value.status == 400 and "too long" in e.value.body


def test_fake_tokenizer_counts():
    assert len(fake_tokenize("")) == 1 and len(fake_tokenize(" abcde fg")) == 1 + 2 + 1


@pytest.mark.timeout(60)
def test_an_interrupted_replay_still_reports_what_it_sent(tmp_path):
    from lenserve.traces.replay import write_outputs

    server = FakeOpenAIServer(FakeServerConfig(ttft_s=0.01, itl_s=0.05)).start_in_thread()
    try:
        trace = Trace([TraceRequest(0.1 * i, 20, 20) for i in range(40)])  # 4 s of arrivals, 1 s responses
        replayer = Replayer(trace, ReplayConfig(url=server.url, show_progress=False, metrics_interval_s=0))

        async def main():
            task = asyncio.create_task(replayer.run())
            while sum(r.sent_s is not None for r in replayer.records) < 8 and not task.done():
                await asyncio.sleep(0.05)
            task.cancel()  # what Ctrl-C does to asyncio.run's main task
            await task

        asyncio.run(main())
    finally:
        server.stop_thread()
    assert replayer.interrupted and 8 <= len(replayer.records) < 40
    statuses = {r.status for r in replayer.records}
    assert statuses <= {200, "cancelled"} and "cancelled" in statuses
    report = write_outputs(replayer, tmp_path)
    assert report["interrupted"] and report["failures_by_status"]["cancelled"] >= 1
    assert "interrupted" in (tmp_path / "report.md").read_text()


def test_exact_replay_turns_prefix_blocks_into_shared_tokens():
    """A trace with block ids (Mooncake's 512-token blocks) replayed with 16-token blocks: lengths
    scale by 16/512, prompts whose ids agree share exactly those blocks' tokens, and a request's
    session goes as `user`."""
    from lenserve.traces.prompts import ExactPromptBuilder
    from tests.traces.test_prompts import FakeCounter

    reqs = [TraceRequest(0.0, 2048, 5, session_id="s1", hash_ids=(1, 2, 3, 4)), TraceRequest(1.0, 1536, 7, hash_ids=(1, 2, 9))]
    trace = Trace(reqs, meta={"block_tokens": 512})
    replayer = Replayer(trace, ReplayConfig(url="http://x", prefix_block_tokens=16, show_progress=False))
    builder = asyncio.run(ExactPromptBuilder.create(FakeCounter()))
    a, na, ma = replayer._payload(0, 2048, 5, builder, reqs[0].hash_ids, "s1")
    b, nb, _ = replayer._payload(1, 1536, 7, builder, reqs[1].hash_ids, None)
    assert (na, nb, ma) == (64, 48, 5) and a["ignore_eos"] and a["user"] == "s1" and "user" not in b
    ta, tb = fake_tokenize(a["prompt"]), fake_tokenize(b["prompt"])
    assert len(ta) == 64 and len(tb) == 48
    assert ta[:33] == tb[:33] and ta[33:37] != tb[33:37]  # BOS + 2 blocks shared, then apart
