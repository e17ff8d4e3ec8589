-- What each request cost in US dollars: the upstream's reported usage (input, cached input,
-- output and reasoning tokens) at the model's price (the operator's [[upstreams.models_config]]
-- prices, else the genai-prices table; policies/pricing.py). NULL when the upstream reported
-- no usage or the model has no known price: never a guess.
ALTER TABLE logged_decisions ADD COLUMN IF NOT EXISTS cost_usd DOUBLE PRECISION;
