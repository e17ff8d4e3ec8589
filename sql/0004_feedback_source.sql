-- Which signal a decision_feedback row holds: explicit (record-outcome), judge (LLM-as-judge)
-- or implicit (regeneration). A stronger source replaces a weaker one (policies/signals.py);
-- rows written before this migration are explicit feedback.
ALTER TABLE decision_feedback ADD COLUMN IF NOT EXISTS source TEXT NOT NULL DEFAULT 'explicit';
