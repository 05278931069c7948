"""The evaluation protocol's fixed choices, in one place: its version, the equivalence margins, the drift set's size.

VERSION is part of the evaluate stage's identity (configs/evaluate.py `protocol`): bump it whenever the items a
domain scores or the way it scores them change, so a stored evaluation of another protocol is redone, never mixed
into a table with new ones. Version 2 (issue 30): code ids path:qualname:line with a bootstrap by source file,
BFCL held out at 10% (tool use ~160 items), tool use by the teacher-forced greedy match of the canonical call
(call_greedy), safety decoded to 48 new tokens, math groups whose answers outgrow the budget reported apart, the
drift NLL.
"""
VERSION = 2
POINTS_MARGIN = 5.0   # TOST margin of rates, in percentage points
NLL_MARGIN = 0.02     # TOST margin of NLL domains, in nats per token
