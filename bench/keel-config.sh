# Sourced by the benchmarks that run `keel up`. keel_config FILE TOKEN PAYMENT_WINDOW_MS writes a
# keel.toml for the whole system on loopback (every port picked by the kernel, data in ./data)
# with the rate limits off, since all load comes from one address.
keel_config() {
  cat > "$1" <<CONF
data_dir = "data"
admin_token = "$2"
[gateway]
listen = "127.0.0.1:0"
admin = "127.0.0.1:0"
[registry]
listen = "127.0.0.1:0"
[api]
listen = "127.0.0.1:0"
[inventory]
listen = "127.0.0.1:0"
[orders]
listen = "127.0.0.1:0"
payment_window_ms = $3
[limits]
buy_per_ip_per_second = 0.0
buy_per_user_per_second = 0.0
CONF
}
