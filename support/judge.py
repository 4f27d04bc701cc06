"""Scoring model responses with an LLM judge, through the official openai SDK.

Two kinds of question: the seed's (test_ift.py), one model's answer scored from 0 to 100
with a bare integer in reply (judge_prompt, parse_score); and the later original's
(ift_judge.py), several models' answers to one instruction side by side, shown as
"Model 1", "Model 2", ... and scored in one JSON reply (comparative_prompt,
parse_comparison). score_all asks either, with the parser that goes with it.

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
- a reply the parser can't read (not an integer from 0 to 100; not JSON scoring every
  model) is asked again once, then the record is counted as unscored;
- a rejected key (401/403), an unknown model or endpoint (404) or an exhausted quota
  would fail every request the same way, so they stop the whole run.
"""

import asyncio
import dataclasses
import json
import math
import os
import re

import click

DEFAULT_MODEL = "gpt-5.1"               # the seed's test_ift.py
COMPARATIVE_DEFAULT_MODEL = "gpt-5.5"   # the later original's ift_judge.py
SCORE_EXPECTED = "an integer from 0 to 100"
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


# --- the side-by-side question ---

def _fenced(text) -> str:
    """text in a code fence longer than any run of backticks in it, so that no answer can
    close its fence early and pass for the judge's instructions."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}\n{text}\n{fence}"


def comparative_prompt(prompt, reference, responses) -> str:
    """One question about several models' answers to the same instruction: the prompt the
    models saw, a correct answer, and the answers as "Model 1", "Model 2", ... in the order
    given (the caller shuffles it), to be scored 0-100 in one JSON object."""
    shape = ",\n".join(f'  "Model {number}": {{"score": <0 to 100>, "comments": "<optional>"}}'
                        for number in range(1, len(responses) + 1))
    answers = "\n\n".join(f"# Model {number}\n\n{_fenced(response)}"
                           for number, response in enumerate(responses, 1))
    return (f"You are judging {len(responses)} language models, each fine-tuned to follow instructions, "
            f"on how well they carried out the same request.\n\n"
            f"## The request\n\n{_fenced(prompt)}\n\n"
            f"## A correct answer\n\n{_fenced(reference)}\n\n"
            f"Score each model's answer from 0 to 100, where 100 is best, and reply with JSON only, "
            f"in exactly this shape (the comments, on why, may be left out):\n\n"
            f"```json\n{{\n{shape}\n}}\n```\n\n"
            f"## The models' answers\n\n{answers}\n")


def comparison_expected(count) -> str:
    return f'a JSON object scoring "Model 1" to "Model {count}" from 0 to 100'


def parse_comparison(reply, count):
    """[(score, comments)] for "Model 1" .. "Model count" of a JSON reply (in a code fence
    or not), else None: a reply that isn't JSON, or lacks a model, or gives one a score
    that isn't a number from 0 to 100. Comments are optional ("" when absent)."""
    text = (reply or "").strip()
    fenced = re.fullmatch(r"```(?:json)?[ \t]*\n(.*)\n[ \t]*```", text, flags=re.DOTALL)
    if fenced is not None:
        text = fenced.group(1)
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    verdicts = []
    for number in range(1, count + 1):
        entry = data.get(f"Model {number}")
        score = entry.get("score") if isinstance(entry, dict) else None
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score) \
                or not 0 <= score <= 100:
            return None
        comments = entry.get("comments")
        verdicts.append((score, "" if comments is None else comments if isinstance(comments, str)
                         else json.dumps(comments)))
    return verdicts


# --- settings ---

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


def settings_from_environment(model, api, base_url, concurrency, max_retries, or_else=None) -> JudgeSettings:
    """Settings with the key from OPENAI_API_KEY; raises JudgeError at once if OpenAI needs
    one (its line ends with or_else, another way out, when given)."""
    api_key = os.environ.get("OPENAI_API_KEY", "").strip()
    if not api_key:
        if not base_url:
            ways = ["Set it", "point OPENAI_BASE_URL (or --judge-base-url) at a local OpenAI-compatible server"]
            ways += [or_else] if or_else else []
            raise JudgeError("OPENAI_API_KEY is not set: the judge needs it. "
                             + ", ".join(ways[:-1]) + ", or " + ways[-1])
        api_key = PLACEHOLDER_KEY
    return JudgeSettings(model=model, api=api, base_url=base_url or None, api_key=api_key,
                         concurrency=concurrency, max_retries=max_retries)


def judge_options(default_model):
    """The judge's command-line options, the same in every script that judges: a
    decorator for a click command, whose function then takes judge_model, judge_api,
    judge_base_url, judge_concurrency and judge_max_retries."""
    options = [
        click.option("--judge-model", default=default_model, show_default=True,
                     help="Model that scores the responses."),
        click.option("--judge-api", type=click.Choice(APIS), default="responses", show_default=True,
                     help="OpenAI's Responses API, or Chat Completions (what Ollama, vLLM and llama.cpp "
                          "serve)."),
        click.option("--judge-base-url", envvar="OPENAI_BASE_URL", show_envvar=True, default=None,
                     help="An OpenAI-compatible server, e.g. http://localhost:11434/v1 "
                          "(default: api.openai.com)."),
        click.option("--judge-concurrency", default=8, show_default=True, type=click.IntRange(min=1),
                     help="Judge requests in flight at once."),
        click.option("--judge-max-retries", default=5, show_default=True, type=click.IntRange(min=0),
                     help="Retries of a request after a rate limit, server error or lost connection."),
    ]

    def decorate(command):
        for option in reversed(options):  # listed in --help in this order
            command = option(command)
        return command
    return decorate


@dataclasses.dataclass
class Verdict:
    score: object        # what the parser made of the reply; None: unscored, and error says why
    reply: str | None    # the judge's last reply, as it came
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


async def _judge_one(client, settings, prompt, parse, expected) -> Verdict:
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
        score = parse(reply)
        if score is not None:
            return Verdict(score=score, reply=reply)
    return Verdict(score=None, reply=reply, error=f"reply is not {expected}: {reply!r}")


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


async def _score_all(settings, prompts, on_verdict, parse, expected):
    semaphore = asyncio.Semaphore(settings.concurrency)

    stopping = asyncio.Event()

    async def judge(index):
        async with semaphore:
            if stopping.is_set():  # a fatal answer came in while this one waited its turn
                return
            try:
                verdict = await _judge_one(client, settings, prompts[index], parse, expected)
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


def score_all(settings, prompts, on_verdict, parse=parse_score, expected=SCORE_EXPECTED):
    """Judge every prompt; on_verdict(index, Verdict) is called as each one finishes.

    parse turns a reply into the verdict's score, or None for a reply it can't read
    (asked again once, then unscored: "reply is not {expected}: ...")."""
    asyncio.run(_score_all(settings, prompts, on_verdict, parse, expected))


def model_warning(settings):
    """Ask the judge for its model list before any long work (a wrong key or address
    fails here, as JudgeError); a warning line when it doesn't list settings.model
    (servers name models loosely), else None."""
    models = check(settings)
    if models is None or settings.model in models:
        return None
    listed = ", ".join(models[:10]) + (", ..." if len(models) > 10 else "")
    return (f"Warning: the judge at {settings.where} doesn't list model "
            f"'{settings.model}' (it lists: {listed or 'nothing'})")
