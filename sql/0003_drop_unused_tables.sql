-- Drop the tables nothing ever wrote or read (created by 0002 after the deployment guide):
--   optimization_results: each promotion and its evidence is already a rollout_events row
--                         (kind 'promote', evidence JSONB with the OPE lower bound and samples);
--   slo_metrics:          SLO evaluations are exported live as thermostat_slo_* metrics;
--   waivers:              waivers live in the guards' state store (Redis or data_dir/state),
--                         with every create/revoke in audit_log.
-- The SQLite decision log never had them; tests/storage/test_schema_parity.py keeps both equal.

DROP TABLE IF EXISTS optimization_results;
DROP TABLE IF EXISTS slo_metrics;
DROP TABLE IF EXISTS waivers;
