-- Why an answer failed its schema check (`response_format` json_schema, a tool's `parameters`):
-- schema paths and error kinds only, never text from the prompt or the answer
-- (policies/validators.py `Violation.reason`), at most 200 characters. NULL when nothing
-- was checked or the answer conformed.
ALTER TABLE logged_decisions ADD COLUMN IF NOT EXISTS validator_reason VARCHAR(200);
