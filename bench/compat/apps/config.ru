# A Rack app for Puma under herd (Puma takes herd's socket from LISTEN_FDS):
#   herd run -l 127.0.0.1:3000 -i 2 --cwd bench/compat/apps -- puma --bind-to-activated-sockets only config.ru
require 'json'
run lambda { |env|
  body = JSON.generate(pid: Process.pid, instance: ENV['HERD_INSTANCE'], server: 'puma')
  [200, { 'content-type' => 'application/json', 'content-length' => body.bytesize.to_s }, [body]]
}
