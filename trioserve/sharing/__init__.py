"""The sharing of a model's slots between users: who a request is (``identity``), the fair
order of waiting requests (``fair_queue``) and the per-model gate (``admission``).

Both sides use it: the gateway admits requests through it, the supervision side owns one
``Admission`` per model. It imports neither.
"""
