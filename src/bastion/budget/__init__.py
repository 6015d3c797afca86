"""Token budgets per principal and calendar period (day, ISO week, month), and the usage ledger.

`policy` (what a budget is), `calendar` (when periods start and reset), `ledger`
(reserve, settle, release in memory, journaled to SQLite by `sqlite`), `redis`
(the same ledger shared by several gateways), `middleware` and `endpoint` (the
request-path stage and `GET /v1/usage`), `report` and `cli` (`bastion usage`).
Nothing here imports this package's other modules from `__init__`, so the auth
package can use `policy` without pulling in the rest.
"""
