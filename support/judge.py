"""Scoring model responses with an LLM judge, through the official openai SDK.

The judge is OpenAI's Responses API by default (as the seed), or Chat Completions for
OpenAI-compatible servers (Ollama, vLLM, llama.cpp) that don't speak Responses.
Requests run concurrently, at most `concurrency` at a time. The SDK's own retries are
switched off so the policy is ours and visible here:

- 408, 409, 429 and 5xx answers and connection failures are retried up to
  `max_retries` times, waiting what the server's retry-after(-ms) header asks
  (up to a minute) or else an exponential backoff with jitter;
- a reply that isn't an integer from 0 to 100 is asked again once, then the
  record is counted as unscored;
- a rejected key (401/403), an unknown model or endpoint (404) or an exhausted
  quota would fail every request the same way, so they stop the whole run.
"""

import asyncio
import dataclasses
import os
import random
import re

import click

DEFAULT_MODEL = "gpt-5.1"
APIS = ("responses", "chat")
BACKOFF_START_SECONDS = 0.5
BACKOFF_MAX_SECONDS = 30.0
RETRY_AFTER_MAX_SECONDS = 60.0
# Local servers ignore the key, but the SDK refuses to start without one.
PLACEHOLDER_KEY = "no-key-needed"


class JudgeError(click.ClickException):
    """The judge can't be used at all (no key, rejected key, unreachable, unknown model)."""


def judge_prompt(prompt, reference, response) -> str:
    """The seed's question to the judge."""
    return (f"Given the input `{prompt}` and correct output `{reference}`, score the model "
            f"response `{response}` on a scale of 0 to 100, where 100 is the best score. "
            f"Respond with the integer number only.")


def parse_score(reply):
    """The integer 0..100 that a reply consists of (surrounding whitespace allowed), else None."""
    match = re.fullmatch(r"\s*(\d{1,3})\s*", reply or "", flags=re.ASCII)
    if match is None or int(match.group(1)) > 100:
        return None
    return int(match.group(1))


@dataclasses.dataclass(frozen=True)
class JudgeSettings:
    model: str = DEFAULT_MODEL
    api: str = "responses"
    base_url: str | None = None   # None: the SDK's default, api.openai.com
    api_key: str = PLACEHOLDER_KEY
    concurrency: int = 8
    max_retries: int = 5

    @property
    def where(self):
        return self.base_url or "api.openai.com"


def settings_from_environment(model, api, base_url, concurrency, max_retries) -> JudgeSettings:
    """Settings with the key from OPENAI_API_KEY; raises JudgeError at once if OpenAI needs one."""
    api_key = os.environ.get("OPENAI_API_KEY", "").strip()
    if not api_key:
        if not base_url:
            raise JudgeError(
                "OPENAI_API_KEY is not set: the judge needs it. Set it, point OPENAI_BASE_URL "
                "(or --judge-base-url) at a local OpenAI-compatible server, or pass --no-judge"
            )
        api_key = PLACEHOLDER_KEY
    return JudgeSettings(model=model, api=api, base_url=base_url or None, api_key=api_key,
                         concurrency=concurrency, max_retries=max_retries)


@dataclasses.dataclass
class Verdict:
    score: int | None   # None: unscored, and error says why
    reply: str | None   # the judge's last reply, as it came
    error: str | None = None


# --- talking to the judge ---
# Each function below that uses openai imports it itself, not once at the top: the SDK
# takes seconds to import, and test_ift.py reads this module's defaults for its --help.

def _client(settings) -> "openai.AsyncOpenAI":
    import openai

    options = {"base_url": settings.base_url} if settings.base_url else {}
    return openai.AsyncOpenAI(api_key=settings.api_key, max_retries=0, **options)


def _describe(error) -> str:
    import openai

    if isinstance(error, openai.APIStatusError):
        body = error.body if isinstance(error.body, dict) else {}
        message = body.get("message") or error.message
        return f"HTTP {error.status_code}: {message}"
    return f"{type(error).__name__}: {error}"


def _is_retryable(error) -> bool:
    import openai

    if isinstance(error, openai.APIConnectionError):  # includes timeouts
        return True
    if not isinstance(error, openai.APIStatusError) or error.code == "insufficient_quota":
        return False  # waiting won't bring quota back
    return error.status_code in (408, 409, 429) or error.status_code >= 500


def _fatal(error, settings) -> JudgeError | None:
    """A JudgeError for answers that would repeat for every record, else None."""
    import openai

    if isinstance(error, (openai.AuthenticationError, openai.PermissionDeniedError)):
        return JudgeError(f"the judge at {settings.where} rejected the API key ({_describe(error)})")
    if isinstance(error, openai.NotFoundError):
        hint = " (does the server speak the Responses API? try --judge-api chat)" \
            if settings.api == "responses" else ""
        return JudgeError(f"the judge at {settings.where} has no model '{settings.model}' or no "
                          f"{settings.api} endpoint{hint} ({_describe(error)})")
    if isinstance(error, openai.RateLimitError) and error.code == "insufficient_quota":
        return JudgeError(f"the judge at {settings.where} reports no quota left ({_describe(error)})")
    return None


def retry_delay(retry, headers=None) -> float:
    """Seconds to wait before retry number `retry` (0-based)."""
    for header, seconds_per_unit in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = (headers or {}).get(header)
        try:
            delay = float(value) * seconds_per_unit
        except (TypeError, ValueError):
            continue
        if 0 <= delay <= RETRY_AFTER_MAX_SECONDS:
            return delay
    backoff = min(BACKOFF_START_SECONDS * 2 ** retry, BACKOFF_MAX_SECONDS)
    return backoff * random.uniform(0.75, 1.0)  # jitter: concurrent requests don't retry in step


async def _with_retries(settings, request):
    """Await request() until it succeeds; an error that retrying can't fix is raised at once."""
    import openai

    for retry in range(settings.max_retries + 1):
        try:
            return await request()
        except openai.APIError as error:
            if not _is_retryable(error) or retry == settings.max_retries:
                raise
            response = getattr(error, "response", None)
            await asyncio.sleep(retry_delay(retry, response.headers if response is not None else None))


async def _ask(client, settings, prompt) -> str:
    if settings.api == "responses":
        response = await client.responses.create(model=settings.model, input=prompt)
        return response.output_text
    completion = await client.chat.completions.create(
        model=settings.model, messages=[{"role": "user", "content": prompt}])
    return completion.choices[0].message.content if completion.choices else ""


async def _judge_one(client, settings, prompt) -> Verdict:
    import openai

    reply = None
    for _ in range(2):  # a malformed reply gets one more chance
        try:
            reply = await _with_retries(settings, lambda: _ask(client, settings, prompt))
        except openai.APIError as error:
            fatal = _fatal(error, settings)
            if fatal is not None:
                raise fatal from None
            gave_up = (f" (gave up after {settings.max_retries + 1} attempts)"
                       if _is_retryable(error) else "")
            return Verdict(score=None, reply=reply, error=_describe(error) + gave_up)
        score = parse_score(reply)
        if score is not None:
            return Verdict(score=score, reply=reply)
    return Verdict(score=None, reply=reply,
                   error=f"reply is not an integer from 0 to 100: {reply!r}")


async def _check(settings):
    import openai

    async with _client(settings) as client:
        try:
            page = await _with_retries(settings, lambda: client.models.list())
        except (openai.AuthenticationError, openai.PermissionDeniedError) as error:
            raise _fatal(error, settings) from None
        except openai.APIConnectionError as error:
            raise JudgeError(f"cannot reach the judge at {settings.where} ({_describe(error)})") from None
        except openai.APIError:
            return None  # some compatible servers don't list models; the requests will tell
        return [model.id for model in page.data]


def check(settings):
    """Ask the judge for its model list before any long work: a wrong key or address fails here.

    Returns the listed model ids, or None where the server doesn't list them.
    """
    return asyncio.run(_check(settings))


async def _score_all(settings, prompts, on_verdict):
    semaphore = asyncio.Semaphore(settings.concurrency)

    stopping = asyncio.Event()

    async def judge(index):
        async with semaphore:
            if stopping.is_set():  # a fatal answer came in while this one waited its turn
                return
            try:
                verdict = await _judge_one(client, settings, prompts[index])
            except JudgeError:
                stopping.set()
                raise
        on_verdict(index, verdict)

    async with _client(settings) as client:
        tasks = [asyncio.create_task(judge(index)) for index in range(len(prompts))]
        try:
            for finished in asyncio.as_completed(tasks):
                await finished  # the first fatal error stops the rest
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def score_all(settings, prompts, on_verdict):
    """Judge every prompt; on_verdict(index, Verdict) is called as each one finishes."""
    asyncio.run(_score_all(settings, prompts, on_verdict))
