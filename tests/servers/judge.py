"""A stand-in OpenAI-compatible judge on 127.0.0.1, speaking real HTTP.

Endpoints: POST /v1/responses (Responses API), POST /v1/chat/completions (Chat
Completions), GET /v1/models. Replies have the JSON shapes the openai SDK parses
(`output[].content[].text` of type output_text, `choices[].message.content`).

It reads both kinds of judge prompt (support/judge.py): the seed's, one response scored
with a bare integer, and the side-by-side one, several responses shown as "# Model N"
blocks and scored in one JSON object. What it answers is scripted by the reference
output inside each prompt: a `[judge STEP STEP ...]` tag there lists what successive
requests for that prompt get, the last step repeating:

    reply:TEXT          answer TEXT (no spaces)
    compare             the JSON a side-by-side prompt asks for: each model the score
                        that a `[score N]` tag in its response names (50 without one),
                        with a comment naming the model as it was shown
    compare-fenced      the same, in a ```json code fence
    compare-without:N   the same without "Model N"
    http429             429 rate limit, with retry-after-ms: 10
    http429:N           429 rate limit, with retry-after: N (seconds)
    http500             500 server error, no retry header (the client's own backoff applies)
    http400             400 bad request
    quota               429 with code insufficient_quota

Without a tag the answer is "50" to the seed's question and `compare` to the side-by-side
one. With `api_key` set, any other bearer token gets 401. `delay` seconds are spent in
every scoring request, to observe concurrency.

    python tests/servers/judge.py --port 8000     # for trying test_ift.py by hand
"""

import argparse
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler

try:
    from servers.local_server import LocalServer
except ImportError:  # run as a script (python tests/servers/NAME.py): its folder is on sys.path
    from local_server import LocalServer

REFERENCE = re.compile(r"and correct output `(.*?)`, score the model response", re.DOTALL)
# The side-by-side prompt's reference and answers, each in a code fence of 3 or more backticks.
COMPARATIVE_REFERENCE = re.compile(r"^## A correct answer\n\n(`{3,})\n(.*?)\n\1$", re.DOTALL | re.MULTILINE)
MODEL_ANSWER = re.compile(r"^# Model (\d+)\n\n(`{3,})\n(.*?)\n\2$", re.DOTALL | re.MULTILINE)
SCRIPT = re.compile(r"\[judge ([^\]]*)\]")
SCORE_TAG = re.compile(r"\[score (\d+)\]")


def script_of(prompt):
    comparative = COMPARATIVE_REFERENCE.search(prompt)
    if comparative:
        reference, default = comparative.group(2), "compare"
    else:
        match = REFERENCE.search(prompt)
        reference, default = (match.group(1) if match else ""), "reply:50"
    tag = SCRIPT.search(reference)
    return tag.group(1).split() if tag else [default]


def comparison(prompt, without=None):
    """The JSON a side-by-side prompt asks for, scored by the answers' own [score N] tags."""
    verdicts = {}
    for number, _, answer in MODEL_ANSWER.findall(prompt):
        tag = SCORE_TAG.search(answer)
        verdicts[f"Model {number}"] = {"score": int(tag.group(1)) if tag else 50,
                                       "comments": f"shown as Model {number}"}
    verdicts.pop(f"Model {without}", None)
    return json.dumps(verdicts)


class JudgeServer(LocalServer):
    def __init__(self, api_key=None, models=("gpt-5.1", "gpt-5.5"), delay=0.0, list_models=True, port=0):
        self.api_key = api_key
        self.models = list(models)
        self.delay = delay
        self.list_models = list_models
        self.posts = 0              # every POST, refused ones included
        self.requests = []          # (path, model, prompt) of every scoring request, in arrival order
        self.attempts = {}          # prompt -> requests seen so far
        self.arrivals = {}          # prompt -> time.monotonic() of each of its requests
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        self.serve(self._handler_class(), port)

    @property
    def url(self):
        return f"{self.root_url}/v1"

    def next_step(self, prompt):
        with self.lock:
            attempt = self.attempts.get(prompt, 0)
            self.attempts[prompt] = attempt + 1
            self.arrivals.setdefault(prompt, []).append(time.monotonic())
        steps = script_of(prompt)
        return steps[min(attempt, len(steps) - 1)]

    def _handler_class(server):  # noqa: N805 - the handler closes over its server
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def send_json(self, status, payload, headers=()):
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for name, value in headers:
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def send_error_json(self, status, message, kind, code=None, headers=()):
                self.send_json(status, {"error": {"message": message, "type": kind, "param": None,
                                                  "code": code}}, headers)

            def authorised(self):
                if server.api_key is None:
                    return True
                if self.headers.get("Authorization") == f"Bearer {server.api_key}":
                    return True
                self.send_error_json(401, "Incorrect API key provided", "invalid_request_error",
                                     "invalid_api_key")
                return False

            def do_GET(self):
                if not self.authorised():
                    return
                if self.path == "/v1/models" and server.list_models:
                    self.send_json(200, {"object": "list", "data": [
                        {"id": name, "object": "model", "created": 0, "owned_by": "stand-in"}
                        for name in server.models]})
                else:
                    self.send_error_json(404, f"no route {self.path}", "invalid_request_error")

            def do_POST(self):
                with server.lock:
                    server.posts += 1
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if not self.authorised():
                    return
                if self.path == "/v1/responses":
                    prompt = body["input"]
                elif self.path == "/v1/chat/completions":
                    prompt = body["messages"][-1]["content"]
                else:
                    self.send_error_json(404, f"no route {self.path}", "invalid_request_error")
                    return
                if body.get("model") not in server.models:
                    self.send_error_json(404, f"The model `{body.get('model')}` does not exist",
                                         "invalid_request_error", "model_not_found")
                    return
                with server.lock:
                    server.requests.append((self.path, body["model"], prompt))
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    time.sleep(server.delay)
                    self.answer(server.next_step(prompt), body["model"], prompt)
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def answer(self, step, model, prompt):
                if step == "compare":
                    step = "reply:" + comparison(prompt)
                elif step == "compare-fenced":
                    step = "reply:```json\n" + comparison(prompt) + "\n```"
                elif step.startswith("compare-without:"):
                    step = "reply:" + comparison(prompt, without=step.removeprefix("compare-without:"))
                if step == "http429":
                    self.send_error_json(429, "Rate limit reached", "requests", "rate_limit_exceeded",
                                         headers=[("retry-after-ms", "10")])
                elif step.startswith("http429:"):
                    self.send_error_json(429, "Rate limit reached", "requests", "rate_limit_exceeded",
                                         headers=[("retry-after", step.removeprefix("http429:"))])
                elif step == "http500":
                    self.send_error_json(500, "The server had an error", "server_error")
                elif step == "http400":
                    self.send_error_json(400, "Invalid prompt", "invalid_request_error")
                elif step == "quota":
                    self.send_error_json(429, "You exceeded your current quota", "insufficient_quota",
                                         "insufficient_quota")
                elif self.path == "/v1/responses":
                    self.send_json(200, responses_reply(model, step.removeprefix("reply:")))
                else:
                    self.send_json(200, chat_reply(model, step.removeprefix("reply:")))

        return Handler


def responses_reply(model, text):
    return {
        "id": "resp_standin", "object": "response", "created_at": int(time.time()),
        "status": "completed", "model": model, "parallel_tool_calls": True,
        "tool_choice": "auto", "tools": [],
        "output": [{"type": "message", "id": "msg_standin", "role": "assistant",
                    "status": "completed",
                    "content": [{"type": "output_text", "text": text, "annotations": []}]}],
    }


def chat_reply(model, text):
    return {
        "id": "chatcmpl-standin", "object": "chat.completion", "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": text}}],
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--model", action="append", default=None)
    arguments = parser.parse_args()
    stand_in = JudgeServer(api_key=arguments.api_key, models=arguments.model or ["gpt-5.1", "gpt-5.5"],
                           port=arguments.port)
    print(f"stand-in judge at {stand_in.url}", flush=True)
    stand_in.httpd.serve_forever()
