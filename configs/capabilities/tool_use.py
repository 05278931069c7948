"""Tool use: BFCL v4 single-call items (schemas in the system turn), scored by the teacher-forced greedy match of the
canonical call and its NLL (one forward pass, no decoding: metric call_greedy), rewarded by BFCL's AST call match.
Fields: configs/capabilities/template.py."""


def get_config():
  return dict(
      name="tool_use",
      description="One function call, in Python syntax, from JSON schemas and a question",
      license="BFCL (bfcl-eval): Apache-2.0",
      data=dict(source="bfcl"),
      metric=dict(name="call_greedy"),
      general=dict(weight=0.25, capability="general"),
  )
