-- Counterfactual decision log (deployment guide schema, extended with what the product needs)
-- and delayed feedback joined by request id. Applied by `thermostat migrate` / at start-up.

CREATE TABLE IF NOT EXISTS logged_decisions (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    request_id UUID NOT NULL,
    task_type VARCHAR(255) NOT NULL,
    model_name VARCHAR(255) NOT NULL,
    context_fingerprint BIGINT NOT NULL,
    context_features JSONB NOT NULL,
    chosen_params JSONB NOT NULL,          -- what left Thermostat ({"temperature":..,"max_tokens":..})
    log_propensity DOUBLE PRECISION NOT NULL,  -- ln(behaviour propensity of chosen_params)
    outcome JSONB NOT NULL,                -- the full Outcome record
    policy_version VARCHAR(50) NOT NULL,
    timestamp TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),  -- decision time
    -- product extensions
    baseline_params JSONB NOT NULL,
    policy_params JSONB,                   -- what the policy chose (differs from chosen in shadow)
    policy_log_propensity DOUBLE PRECISION,
    policy VARCHAR(64) NOT NULL,
    mode VARCHAR(32) NOT NULL,
    arm_index INTEGER,
    guard_notes JSONB NOT NULL DEFAULT '[]'::jsonb,
    upstream VARCHAR(255) NOT NULL DEFAULT '',
    status INTEGER NOT NULL,
    error_class VARCHAR(64),
    latency_s DOUBLE PRECISION NOT NULL,
    ttft_s DOUBLE PRECISION,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    finish_reason VARCHAR(64),
    quality DOUBLE PRECISION,
    reward DOUBLE PRECISION,
    prompt TEXT,                           -- only with server.store_prompts = true; never headers/keys
    CONSTRAINT logged_decisions_request_id_key UNIQUE (request_id)  -- idempotency key
);

-- time-range scans (control API, OPE windows, prune) and per-task scans
CREATE INDEX IF NOT EXISTS logged_decisions_timestamp_idx ON logged_decisions (timestamp);
CREATE INDEX IF NOT EXISTS logged_decisions_task_timestamp_idx ON logged_decisions (task_type, timestamp);
CREATE INDEX IF NOT EXISTS logged_decisions_mode_timestamp_idx ON logged_decisions (mode, timestamp);

CREATE TABLE IF NOT EXISTS decision_feedback (
    request_id UUID PRIMARY KEY,   -- joins logged_decisions.request_id; no FK: feedback may arrive first
    quality DOUBLE PRECISION NOT NULL,
    reward DOUBLE PRECISION,
    payload JSONB NOT NULL DEFAULT '{}'::jsonb,
    received_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW()
);
CREATE INDEX IF NOT EXISTS decision_feedback_received_at_idx ON decision_feedback (received_at);
