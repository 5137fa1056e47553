"""The Strata console: one web page over the streams, the registry, Ray jobs and serving (`strata console`)."""
