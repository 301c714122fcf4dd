"""Fuzz every route of a running Atelier with schemathesis, from its live /openapi.json.

Each operation gets `--max-examples` cases, drawn from schemathesis' positive (valid by the
schema) and negative (invalid by it) strategies. Every response is checked:

- no 5xx (a 503 `overloaded_error`/`not_ready` with `Retry-After` is the designed overload
  answer and is counted apart, not failed);
- every 4xx/5xx body is the error shape `{"error": {"type", "message", "param"}}`;
- the response conforms to the schema: a documented status code and content type, and a body
  valid against the documented response schema (schemathesis' own checks).

Work the fuzzer starts is kept cheap and cleaned up, so it can run against a shared app:

- routes that generate (`?async` is in their schema) are sent with `async=true`: input checks are
  the same as for a synchronous call, and the job is cancelled as soon as it is accepted; any
  other accepted job (videos, imports, replays) is cancelled too;
- LLM bodies keep their fields, but `n` over 2 becomes 2 and a `max_tokens` between 64 and the
  context length becomes 64 (values past the context still go through and must be refused);
- a dataset or saved workflow the fuzzer created is deleted again; a DELETE is only sent for a
  path that does not exist (a GET of it is not 200), so nothing that was there is deleted;
- `--full-work` turns all of that off (a dedicated app, e.g. on a GPU).

Prints, per route, the statuses seen and the failures (with a curl command to reproduce them);
exits 1 if any check failed.

    .venv/bin/python benchmarks/fuzz_api.py --base-url http://127.0.0.1:8000 [--max-examples 200]
        [--include /v1/images] [--exclude /v1/fine_tuning] [--seed 1] [--full-work]

Against an app with API keys, give an admin-scoped key in `ATELIER_API_KEY` (or `--api-key`): every
request, the schema download included, carries it as `Authorization: Bearer`.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import sys
import time
from typing import Callable

import requests

GENERATIVE_LLM_PATHS = ("/v1/chat/completions", "/v1/completions")
LLM_TOKEN_FIELDS = ("max_tokens", "max_completion_tokens")
LLM_CAPS = {"n": 2, "tokens": 64}
OVERLOAD_TYPES = ("overloaded_error", "not_ready")


@dataclasses.dataclass
class RouteReport:
    label: str
    statuses: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    failures: list[dict] = dataclasses.field(default_factory=list)
    overloaded: int = 0
    skipped: int = 0
    cleaned_up: int = 0
    seconds: float = 0.0

    @property
    def calls(self) -> int:
        return sum(self.statuses.values())


# --- checks -----------------------------------------------------------------------------------


def error_shape_problem(response: requests.Response) -> str | None:
    """Why a 4xx/5xx body is not `{"error": {"type", "message", "param"}}`, or None."""
    try:
        body = response.json()
    except ValueError:
        return f"error body is not JSON: {response.text[:200]!r}"
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return f"error body has no `error` object: {response.text[:200]!r}"
    missing = {"type", "message", "param"} - set(error)
    if missing:
        return f"error object lacks {sorted(missing)}: {error}"
    if not (isinstance(error["type"], str) and error["type"] and isinstance(error["message"], str)
            and error["message"] and (error["param"] is None or isinstance(error["param"], str))):
        return f"error fields have the wrong types: {error}"
    return None


def is_designed_overload(response: requests.Response) -> bool:
    """503 with Retry-After and an overload error type: how Atelier says 'busy, retry'."""
    if response.status_code != 503 or "retry-after" not in response.headers:
        return False
    try:
        return response.json()["error"]["type"] in OVERLOAD_TYPES
    except (ValueError, KeyError, TypeError):
        return False


def schema_checks() -> list[Callable]:
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    return [status_code_conformance, content_type_conformance, response_schema_conformance]


def check_response(case, response: requests.Response) -> list[str]:
    """Every problem with one response (empty: it passed)."""
    from schemathesis.core.failures import FailureGroup

    problems = []
    status = response.status_code
    if status >= 500 and not is_designed_overload(response):
        problems.append(f"server error {status}")
    if status >= 400:
        shape = error_shape_problem(response)
        if shape:
            problems.append(shape)
    try:
        case.validate_response(response, checks=schema_checks())
    except FailureGroup as group:
        problems += [f"{type(f).__name__}: {f.title}: {str(f.message).strip()[:300]}" for f in group.exceptions]
    return problems


# --- keeping the work cheap, and the app as it was ---------------------------------------------


def make_cheap(case, context_length: int | None) -> None:
    """Generate as a job (cancelled at once) and cap LLM budgets; changes nothing the checks see."""
    if any(p.name == "async" for p in case.operation.query):
        case.query = {**(case.query or {}), "async": "true"}
    if case.operation.path in GENERATIVE_LLM_PATHS and isinstance(case.body, dict):
        body = dict(case.body)
        if isinstance(body.get("n"), int) and body["n"] > LLM_CAPS["n"]:
            body["n"] = LLM_CAPS["n"]
        for field in LLM_TOKEN_FIELDS:
            value = body.get(field)
            if isinstance(value, int) and LLM_CAPS["tokens"] < value <= (context_length or 0):
                body[field] = LLM_CAPS["tokens"]
        case.body = body


def exists(session: requests.Session, base_url: str, path: str) -> bool:
    try:
        return session.get(base_url + path, timeout=30).status_code == 200
    except requests.RequestException:
        return True  # unsure: treat as existing, so it is not deleted


def clean_up(session: requests.Session, base_url: str, case, response: requests.Response) -> int:
    """Stop or delete what an accepted request started or created; returns how many things."""
    if response.status_code not in (200, 201, 202):
        return 0
    try:
        body = response.json()
    except ValueError:
        return 0
    if not isinstance(body, dict) or not isinstance(body.get("id"), str):
        return 0
    ident, method, path = body["id"], case.method.upper(), case.operation.path
    if method != "POST":
        return 0
    if response.status_code == 202 and ident.startswith("job_"):
        session.post(f"{base_url}/v1/jobs/{ident}/cancel", timeout=30)
    elif path == "/v1/fine_tuning/jobs":
        session.post(f"{base_url}/v1/fine_tuning/jobs/{ident}/cancel", timeout=30)
    elif path == "/v1/datasets":
        session.delete(f"{base_url}/v1/datasets/{ident}", params={"confirm": body.get("name", ident)}, timeout=30)
    elif path == "/v1/workflows":
        session.delete(f"{base_url}/v1/workflows/{ident}", timeout=30)
    else:
        return 0
    return 1


# --- the run ---------------------------------------------------------------------------------


def load_operations(base_url: str, include: list[str], exclude: list[str], headers: dict[str, str]) -> list:
    import schemathesis

    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json", wait_for_schema=30, headers=headers)
    operations = []
    for result in schema.get_all_operations():
        operation = result.ok()
        label = f"{operation.method.upper()} {operation.path}"
        if include and not any(s in label for s in include):
            continue
        if any(s in label for s in exclude):
            continue
        operations.append(operation)
    return operations


def context_length(session: requests.Session, base_url: str) -> int | None:
    try:
        models = session.get(f"{base_url}/v1/models", timeout=30).json()["data"]
    except (requests.RequestException, ValueError, KeyError):
        return None
    return max((m.get("metadata", {}).get("max_model_len") or 0 for m in models), default=None) or None


def fuzz_operation(operation, base_url: str, session: requests.Session, *, max_examples: int,
                   seed: int | None, full_work: bool, context: int | None, timeout_s: float) -> RouteReport:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed
    from schemathesis import GenerationMode

    report = RouteReport(f"{operation.method.upper()} {operation.path}")
    strategy = operation.as_strategy(GenerationMode.POSITIVE) | operation.as_strategy(GenerationMode.NEGATIVE)

    # No shrinking and no stop at the first failure: every example is sent and every failure kept.
    @settings(max_examples=max_examples, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck), print_blob=False)
    @given(case=strategy)
    def run(case):
        if not full_work:
            make_cheap(case, context)
        if case.method.upper() == "DELETE" and exists(session, base_url, case.formatted_path):
            report.skipped += 1
            return
        try:
            response = case.call(base_url=base_url, session=session, timeout=timeout_s)
        except requests.RequestException as exc:
            report.statuses["no response"] += 1
            report.failures.append({"problems": [f"no response: {type(exc).__name__}: {exc}"],
                                    "curl": case.as_curl_command(base_url=base_url)})
            return
        report.statuses[response.status_code] += 1
        if is_designed_overload(response):
            report.overloaded += 1
        problems = check_response(case, response)
        if problems:
            report.failures.append({"status": response.status_code, "problems": problems,
                                    "body": response.text[:300], "curl": case.as_curl_command(base_url=base_url)})
        if not full_work:
            report.cleaned_up += clean_up(session, base_url, case, response)

    if seed is not None:
        run = hypothesis_seed(seed)(run)
    started = time.perf_counter()
    run()
    report.seconds = time.perf_counter() - started
    return report


def fuzz(base_url: str, *, max_examples: int = 200, include: list[str] = (), exclude: list[str] = (),
         seed: int | None = None, full_work: bool = False, timeout_s: float = 120, api_key: str | None = None,
         on_report: Callable[[RouteReport], None] | None = None) -> list[RouteReport]:
    base_url = base_url.rstrip("/")
    session = requests.Session()
    if api_key:
        session.headers["Authorization"] = f"Bearer {api_key}"
    context = context_length(session, base_url)
    reports = []
    for operation in load_operations(base_url, list(include), list(exclude), dict(session.headers)):
        report = fuzz_operation(operation, base_url, session, max_examples=max_examples, seed=seed,
                                full_work=full_work, context=context, timeout_s=timeout_s)
        reports.append(report)
        if on_report:
            on_report(report)
    return reports


def print_report(report: RouteReport) -> None:
    statuses = " ".join(f"{code}×{count}" for code, count in sorted(report.statuses.items(), key=str))
    extras = "".join(f" {name}={value}" for name, value in (
        ("overloaded", report.overloaded), ("skipped", report.skipped), ("cleaned_up", report.cleaned_up)) if value)
    verdict = f"FAIL ({len(report.failures)})" if report.failures else "ok"
    print(f"{report.label:<48} {report.calls:>5} calls {report.seconds:7.1f}s  {verdict:<9} {statuses}{extras}",
          flush=True)
    for failure in report.failures[:5]:
        print(f"    - {'; '.join(failure['problems'])}")
        if failure.get("body"):
            print(f"      body: {failure['body']}")
        print(f"      {failure['curl']}")
    if len(report.failures) > 5:
        print(f"    ... and {len(report.failures) - 5} more")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", required=True, help="The running app, e.g. http://127.0.0.1:8000")
    parser.add_argument("--max-examples", type=int, default=200, help="Cases per route (default 200).")
    parser.add_argument("--include", action="append", default=[], help="Only routes whose 'METHOD /path' "
                                                                        "contains this (repeatable).")
    parser.add_argument("--exclude", action="append", default=[], help="Skip routes whose 'METHOD /path' "
                                                                       "contains this (repeatable).")
    parser.add_argument("--seed", type=int, default=None, help="Hypothesis seed, to reproduce a run.")
    parser.add_argument("--timeout", type=float, default=120, help="Seconds per request.")
    parser.add_argument("--full-work", action="store_true", help="Run generations synchronously, uncapped, and "
                                                                 "clean nothing up (a dedicated app only).")
    parser.add_argument("--api-key", default=os.environ.get("ATELIER_API_KEY"),
                        help="An admin-scoped key for an app with keys (default: $ATELIER_API_KEY).")
    parser.add_argument("--json", help="Also write the reports to this file.")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    reports = fuzz(args.base_url, max_examples=args.max_examples, include=args.include, exclude=args.exclude,
                   seed=args.seed, full_work=args.full_work, timeout_s=args.timeout, api_key=args.api_key,
                   on_report=print_report)
    calls = sum(r.calls for r in reports)
    failed = [r for r in reports if r.failures]
    print(f"\n{len(reports)} routes, {calls} calls in {time.perf_counter() - started:.0f}s; "
          f"{sum(len(r.failures) for r in reports)} failures on {len(failed)} routes")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{**dataclasses.asdict(r), "statuses": {str(k): v for k, v in r.statuses.items()}}
                       for r in reports], f, indent=2, default=str)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
