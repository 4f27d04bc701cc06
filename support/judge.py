"""Scoring model responses with an LLM judge, through the official openai SDK.

The judge is OpenAI's Responses API by default (as the seed), or Chat Completions for
OpenAI-compatible servers (Ollama, vLLM, llama.cpp) that don't speak Responses.
Requests run concurrently, at most `concurrency` at a time.

Retrying is the SDK's own (`max_retries` on the client; openai's _base_client.py). It
retries a request up to `max_retries` times after a 408, 409, 429 or 5xx answer, a lost
connection or a timeout. Between tries it waits what the answer's retry-after-ms or
retry-after header asks when that is more than 0 and at most two minutes, otherwise 0.5 s
doubling up to 8 s, less up to 25% jitter so concurrent requests don't retry in step; a
retry-after over two minutes isn't waited for: the error comes back at once. A server's
x-should-retry header (true or false) overrides all that. On top of it, ours:

- an exhausted quota (a 429 whose code is insufficient_quota) is not retried: waiting
  won't bring quota back, and it stops the whole run (below);
- a reply that isn't an integer from 0 to 100 is asked again once, then the record is
  counted as unscored;
- a rejected key (401/403), an unknown model or endpoint (404) or an exhausted quota
  would fail every request the same way, so they stop the whole run.
"""

import asyncio
import dataclasses
import os
import re

import click

DEFAULT_MODEL = "gpt-5.1"
APIS = ("responses", "chat")
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
# takes a second to import, and test_ift.py reads this module's defaults for its --help.

async def _no_retry_after_exhausted_quota(response):
    """The SDK retries every 429; x-should-retry: false, a header it obeys, stops it for
    a 429 that says the quota is gone."""
    if response.status_code != 429:
        return
    await response.aread()
    try:
        code = response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return
    if code == "insufficient_quota":
        response.headers["x-should-retry"] = "false"


def _client(settings):
    """An AsyncOpenAI client for the judge (openai is imported here: it is slow to import)."""
    import openai

    options = {"base_url": settings.base_url} if settings.base_url else {}
    http_client = openai.DefaultAsyncHttpxClient(
        event_hooks={"response": [_no_retry_after_exhausted_quota]})
    return openai.AsyncOpenAI(api_key=settings.api_key, max_retries=settings.max_retries,
                              http_client=http_client, **options)


def _describe(error) -> str:
    """What went wrong, and after how many tries when the SDK retried."""
    import openai

    if isinstance(error, openai.APIStatusError):
        body = error.body if isinstance(error.body, dict) else {}
        message = body.get("message") or error.message
        described = f"HTTP {error.status_code}: {message}"
    else:
        described = f"{type(error).__name__}: {error}"
    # The SDK numbers each try in this header of the request it sends.
    retries = int(error.request.headers.get("x-stainless-retry-count", 0))
    return described + (f" (gave up after {retries + 1} attempts)" if retries else "")


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
            reply = await _ask(client, settings, prompt)
        except openai.APIError as error:
            fatal = _fatal(error, settings)
            if fatal is not None:
                raise fatal from None
            return Verdict(score=None, reply=reply, error=_describe(error))
        score = parse_score(reply)
        if score is not None:
            return Verdict(score=score, reply=reply)
    return Verdict(score=None, reply=reply,
                   error=f"reply is not an integer from 0 to 100: {reply!r}")


async def _check(settings):
    import openai

    async with _client(settings) as client:
        try:
            page = await client.models.list()
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
