"""Loaded by the schemathesis CLI (SCHEMATHESIS_HOOKS=tests.reliability.schemathesis_hooks) in
test_fuzz.py: one extra check, every 4xx carries an OpenAI error body."""
import ast
import json

import schemathesis

# Hypothesis names the lambdas inside schemathesis' strategies by parsing their source with
# ast.parse. On CPython before 3.11.8 that parse fails now and then under the schemathesis worker
# threads with "SystemError: AST constructor recursion depth mismatch" (gh-106905), which aborts
# the whole operation. The name is cosmetic: retry, and where it still fails let hypothesis fall
# back to "lambda: <unknown>" as it does for any unparsable source.
_ast_parse = ast.parse


def _tolerant_parse(*args, **kwargs):
    for _ in range(3):
        try:
            return _ast_parse(*args, **kwargs)
        except SystemError as e:
            error = e
    raise SyntaxError(f"ast.parse failed: {error}")


ast.parse = _tolerant_parse


@schemathesis.check
def openai_error_body(ctx, response, case):
    """A 4xx body is exactly {"error": {"message", "type", "param", "code"}} with a message and a type."""
    if not 400 <= response.status_code < 500:
        return
    try:
        body = json.loads(response.content)
    except ValueError:
        raise AssertionError(f"{response.status_code} body is not JSON: {response.content[:200]!r}") from None
    if not isinstance(body, dict) or set(body) != {"error"} or not isinstance(body["error"], dict):
        raise AssertionError(f"{response.status_code} body is not an OpenAI error: {body!r}")
    error = body["error"]
    missing = {"message", "type", "param", "code"} - set(error)
    if missing:
        raise AssertionError(f"{response.status_code} error body lacks {sorted(missing)}: {body!r}")
    if not (isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str) and error["type"]):
        raise AssertionError(f"{response.status_code} error body needs a message and a type: {body!r}")
