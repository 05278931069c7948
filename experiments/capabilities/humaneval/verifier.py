"""The RL reward of the HumanEval example: 1 when the reply is a syntactically valid Python function body, else 0.

A verifier is any function (response, reference) -> a score in [0, 1]; bar_jax counts one that raises or returns
something else, scores that item 0, and goes on. (It does not run the code: that needs a sandbox.)
"""
import ast
import textwrap


def is_python(response: str, reference) -> float:
  body = textwrap.indent(textwrap.dedent(response.strip("\n")), "    ")
  if not body.strip():
    return 0.0
  try:
    ast.parse("def f():\n" + body)
  except SyntaxError:
    return 0.0
  return 1.0
