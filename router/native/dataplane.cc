// The router's native data plane: an HTTP/2 proxy for Triton's gRPC inference calls, on
// nghttp2, whose routing decisions are made by the Python router (router/dataplane.py).
//
// Why HTTP/2 and not a gRPC library: the bytes of requests and responses are relayed as
// they came, so nothing here needs gRPC's call machinery; the per-request cost becomes
// that of a plain HTTP/2 proxy (what nginx's grpc_pass does) plus one Python decision.
// A proxy on gRPC's own C++ callback API cost ~370 us of CPU per request on the project's
// 2-core reference machine, three times nginx; grpcio's Python server ~850 us.
//
// No thread of its own: the router's event loop watches the proxy's epoll descriptor and
// calls poll() when a socket is ready, so a request never waits for a thread hand-off.
// The protocol between the two halves, all on that one thread:
//   proxy -> Python: events, returned by poll(), flush() and take_events():
//     (0, id, request_message, metadata, time_remaining_s | None, streaming)  route it
//     (1, id, status_code, details, responses, latency_s, ttft_s | None, error_in_stream)
//                                                                        it ended
//     (2, id, status_code, details)      its instance failed before any response: route
//                                        it again (once) or reject it
//   Python -> proxy: forward(id, address, request_id, model, wants_empty_final) or
//                    reject(id, status_code, message, request_id, model), then flush()
//                    once per batch: one write per connection for everything it produced.
// Every request Python forwards gets exactly one "ended" event, also when its client is
// gone by then, so the seat it took is always given back.
//
// What is relayed: ModelInfer is routed, and the instance's response (headers, message,
// trailers) goes back as it came. Each request on a ModelStreamInfer stream is routed on
// its own. Those with an id share one upstream stream per instance (see Shared: responses
// are matched by id, and the proxy reads nothing else of them); one without an id gets an
// upstream stream of its own, whose end is the request's end. Responses are relayed whole
// and unchanged, interleaved message by message on the client's stream. Every other method
// goes, unparsed, to the Python router's own gRPC server (the control address). Compressed
// request messages (gzip, deflate) are decompressed, since routing reads them, and go on
// plain; instances are not asked for compressed responses.

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <nghttp2/nghttp2.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;
using Headers = std::vector<std::pair<std::string, std::string>>;

constexpr char kModelInfer[] = "/inference.GRPCInferenceService/ModelInfer";
constexpr char kModelStreamInfer[] = "/inference.GRPCInferenceService/ModelStreamInfer";
constexpr int32_t kWindow = 1 << 24;  // per stream and per connection: buffers, not limits
constexpr size_t kFrameHeader = 5;    // gRPC message prefix: compressed flag, 4-byte length

// gRPC status codes this file produces itself.
enum Code {
  kOk = 0,
  kCancelled = 1,
  kInvalidArgument = 3,
  kDeadlineExceeded = 4,
  kUnimplemented = 12,
  kInternal = 13,
  kUnavailable = 14,
};

struct Status {
  int code = kOk;
  std::string message;
  bool ok() const { return code == kOk; }
};

enum EventKind { kRoute = 0, kEnded = 1, kLost = 2 };

struct Event {
  EventKind kind;
  uint64_t id;
  std::string request;
  Headers metadata;
  std::optional<double> time_remaining_s;
  bool streaming = false;
  int status = 0;
  std::string details;
  int responses = 0;
  double latency_s = 0;
  std::optional<double> ttft_s;
  bool error_in_stream = false;
};

struct Decision {
  enum Kind { kForward, kReject, kStop } kind;
  uint64_t id = 0;
  std::string address, request_id, model, message;
  int code = 0;
  bool wants_empty_final = false;
};

enum class Kind { kUnaryInfer, kStreamInfer, kPassthrough };

struct Connection;
struct Call;
struct Shared;

// What an upstream HTTP/2 stream belongs to: one request (Call) or a Shared stream.
struct Upstreamed {
  bool shared = false;
};

// A client's stream.
struct Downstream {
  Connection* conn;
  int32_t id;
  std::string path;
  Kind kind = Kind::kPassthrough;
  Headers metadata;  // what is forwarded upstream (and shown to routing)
  std::string encoding;  // grpc-encoding of compressed request messages
  std::optional<Clock::time_point> deadline;
  std::string inbuf;
  bool client_done = false, closed = false, cancelled = false;
  bool response_started = false, finishing = false, deferred = false;
  std::string outbox;
  size_t out_off = 0;
  Headers trailers;
  std::unordered_set<Call*> calls;
  std::unordered_map<std::string, Shared*> shared;  // by instance address
  std::unordered_set<Shared*> ending;  // replaced in `shared` while still closing
};

// One request on its way to an instance (or, unrouted, to the control address).
struct Call : Upstreamed {
  uint64_t id = 0;
  Downstream* down;
  bool routed;
  bool streaming;
  std::string framed;  // the gRPC-framed request message
  size_t sent = 0;
  Clock::time_point started = Clock::now();
  std::optional<Clock::time_point> first_response;
  int responses = 0;
  bool error_in_stream = false, retried = false, cancel_requested = false;
  std::string address, request_id, model;
  bool wants_empty_final = false;
  Shared* via = nullptr;  // the shared stream carrying it, if any
  Connection* up = nullptr;
  int32_t up_stream = -1;
  // The instance's answer.
  bool answered = false;  // response headers came
  Headers response_headers, response_trailers;
  std::string body, partial;
  std::optional<Status> grpc_status;
};

// One upstream ModelStreamInfer stream that carries a client stream's requests (those
// with an id) to one instance, as the client's own stream would. Responses are matched to
// requests by id; a request ends with its final response, which the router makes every
// model send (triton_enable_empty_final_response) and drops again unless the client
// asked for it.
struct Shared : Upstreamed {
  Shared() { shared = true; }
  Downstream* down = nullptr;
  Connection* up = nullptr;
  int32_t up_stream = -1;
  std::string address;
  std::string outbox;
  size_t out_off = 0;
  bool deferred = false, closing = false, cancel_requested = false;
  std::unordered_map<std::string, Call*> pending;
  std::string partial;
  std::optional<Status> grpc_status;
};

struct Connection {
  int fd = -1;
  nghttp2_session* session = nullptr;
  bool upstream = false;
  std::string address;
  std::string pending;  // bytes nghttp2 produced that the socket did not take yet
  bool connecting = false, closed = false, writable_watch = false, dirty = false;
  bool retiring = false;  // takes no new streams (GOAWAY, ids used up)
  std::unordered_set<Downstream*> downstreams;
  std::unordered_set<Call*> calls;
  std::unordered_set<Shared*> shared;
  ~Connection() {
    if (session != nullptr) nghttp2_session_del(session);
  }
};

std::string PercentEncode(const std::string& text) {
  static const char kHex[] = "0123456789ABCDEF";
  std::string out;
  for (unsigned char ch : text) {
    if (ch < 0x20 || ch > 0x7E || ch == '%') {
      out += '%';
      out += kHex[ch >> 4];
      out += kHex[ch & 15];
    } else {
      out += static_cast<char>(ch);
    }
  }
  return out;
}

std::string PercentDecode(const std::string& text) {
  std::string out;
  for (size_t i = 0; i < text.size(); ++i) {
    if (text[i] == '%' && i + 2 < text.size()) {
      int value = 0;
      if (sscanf(text.c_str() + i + 1, "%2x", &value) == 1) {
        out += static_cast<char>(value);
        i += 2;
        continue;
      }
    }
    out += text[i];
  }
  return out;
}

std::optional<Clock::duration> ParseGrpcTimeout(const std::string& value) {
  if (value.size() < 2) return std::nullopt;
  char unit = value.back();
  char* end = nullptr;
  double amount = static_cast<double>(strtoull(value.c_str(), &end, 10));
  if (end != value.c_str() + value.size() - 1) return std::nullopt;
  double seconds;
  switch (unit) {
    case 'H': seconds = amount * 3600; break;
    case 'M': seconds = amount * 60; break;
    case 'S': seconds = amount; break;
    case 'm': seconds = amount / 1e3; break;
    case 'u': seconds = amount / 1e6; break;
    case 'n': seconds = amount / 1e9; break;
    default: return std::nullopt;
  }
  // Clients write "no deadline" as a huge timeout (Go: ~2.5 million hours); past a year it
  // is that, and adding it to the clock would overflow.
  if (seconds > 365.0 * 24 * 3600) return std::nullopt;
  return std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
}

std::string Framed(const std::string& message) {
  std::string out(kFrameHeader, '\0');
  uint32_t length = htonl(static_cast<uint32_t>(message.size()));
  memcpy(&out[1], &length, 4);
  out += message;
  return out;
}

// Complete gRPC messages at the front of `buffer`, each with its 5-byte prefix.
std::vector<std::string> TakeMessages(std::string* buffer) {
  std::vector<std::string> messages;
  size_t offset = 0;
  while (buffer->size() - offset >= kFrameHeader) {
    uint32_t length;
    memcpy(&length, buffer->data() + offset + 1, 4);
    length = ntohl(length);
    if (buffer->size() - offset < kFrameHeader + length) break;
    messages.emplace_back(buffer->substr(offset, kFrameHeader + length));
    offset += kFrameHeader + length;
  }
  buffer->erase(0, offset);
  return messages;
}

void PutVarint(std::string* out, uint64_t value) {
  while (value >= 0x80) {
    out->push_back(static_cast<char>((value & 0x7F) | 0x80));
    value >>= 7;
  }
  out->push_back(static_cast<char>(value));
}

void PutField(std::string* out, int field, const std::string& bytes) {
  PutVarint(out, (static_cast<uint64_t>(field) << 3) | 2);
  PutVarint(out, bytes.size());
  out->append(bytes);
}

// ModelStreamInferResponse{error_message, infer_response{model_name, id,
// parameters{"triton_final_response": bool_param true}}}: what Triton sends for a request
// that failed inside a stream, so the client ends that request and keeps the stream.
std::string StreamErrorResponse(const std::string& message, const std::string& request_id,
                                const std::string& model) {
  std::string entry;
  PutField(&entry, 1, "triton_final_response");
  PutField(&entry, 2, std::string("\x08\x01", 2));
  std::string infer;
  if (!model.empty()) PutField(&infer, 1, model);
  if (!request_id.empty()) PutField(&infer, 3, request_id);
  PutField(&infer, 4, entry);
  std::string response;
  PutField(&response, 1, message);
  PutField(&response, 2, infer);
  return response;
}

// ModelInferRequest.parameters["triton_enable_empty_final_response"] = true, as bytes to
// append to a serialized request (an appended map entry adds or replaces that key).
std::string AskEmptyFinal() {
  std::string entry;
  PutField(&entry, 1, "triton_enable_empty_final_response");
  PutField(&entry, 2, std::string("\x08\x01", 2));
  std::string field;
  PutField(&field, 4, entry);
  return field;
}

bool ReadVarint(const uint8_t** p, const uint8_t* end, uint64_t* value) {
  *value = 0;
  for (int shift = 0; shift < 64 && *p < end; shift += 7) {
    uint8_t byte = *(*p)++;
    *value |= static_cast<uint64_t>(byte & 0x7F) << shift;
    if (!(byte & 0x80)) return true;
  }
  return false;
}

// Calls `field(number, wire_type, data, length_or_varint)` for each field of a message.
template <typename Visit>
bool ForEachField(const uint8_t* p, const uint8_t* end, Visit visit) {
  while (p < end) {
    uint64_t key, value;
    if (!ReadVarint(&p, end, &key)) return false;
    int wire = static_cast<int>(key & 7);
    if (wire == 0) {
      if (!ReadVarint(&p, end, &value)) return false;
      visit(key >> 3, wire, nullptr, value);
    } else if (wire == 2) {
      if (!ReadVarint(&p, end, &value) || value > static_cast<uint64_t>(end - p)) return false;
      visit(key >> 3, wire, p, value);
      p += value;
    } else if (wire == 1 || wire == 5) {
      size_t size = wire == 1 ? 8 : 4;
      if (static_cast<size_t>(end - p) < size) return false;
      p += size;
    } else {
      return false;
    }
  }
  return true;
}

// What the router reads of a ModelStreamInferResponse: which request, and whether it is
// that request's last (and empty) response.
struct ResponseFacts {
  std::string id;
  bool error = false, has_final_flag = false, final_flag = false, has_outputs = false;
  bool final() const { return !has_final_flag || final_flag || error; }
  bool empty() const { return !has_outputs && !error; }
};

bool ReadResponseFacts(const std::string& framed, ResponseFacts* facts) {
  auto* begin = reinterpret_cast<const uint8_t*>(framed.data()) + kFrameHeader;
  auto* end = reinterpret_cast<const uint8_t*>(framed.data()) + framed.size();
  return ForEachField(begin, end, [&](uint64_t field, int wire, const uint8_t* data,
                                      uint64_t size) {
    if (field == 1 && wire == 2) {
      facts->error = size > 0;
    } else if (field == 2 && wire == 2) {
      ForEachField(data, data + size, [&](uint64_t f, int w, const uint8_t* d, uint64_t n) {
        if (w != 2) return;
        if (f == 3) {
          facts->id.assign(reinterpret_cast<const char*>(d), n);
        } else if (f == 5 || f == 6) {
          facts->has_outputs = true;
        } else if (f == 4) {
          std::string key;
          bool value = false;
          ForEachField(d, d + n, [&](uint64_t ef, int ew, const uint8_t* ed, uint64_t en) {
            if (ef == 1 && ew == 2) key.assign(reinterpret_cast<const char*>(ed), en);
            if (ef == 2 && ew == 2)
              ForEachField(ed, ed + en, [&](uint64_t pf, int pw, const uint8_t*, uint64_t pv) {
                if (pf == 1 && pw == 0) value = pv != 0;
              });
          });
          if (key == "triton_final_response") {
            facts->has_final_flag = true;
            facts->final_flag = value;
          }
        }
      });
    }
  });
}

bool Inflate(const std::string& compressed, bool gzip, std::string* out) {
  z_stream zs{};
  if (inflateInit2(&zs, gzip ? 16 + MAX_WBITS : MAX_WBITS) != Z_OK) return false;
  zs.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(compressed.data()));
  zs.avail_in = static_cast<uInt>(compressed.size());
  char chunk[65536];
  int rc;
  do {
    zs.next_out = reinterpret_cast<Bytef*>(chunk);
    zs.avail_out = sizeof(chunk);
    rc = inflate(&zs, Z_NO_FLUSH);
    if (rc != Z_OK && rc != Z_STREAM_END) break;
    out->append(chunk, sizeof(chunk) - zs.avail_out);
  } while (rc != Z_STREAM_END);
  inflateEnd(&zs);
  return rc == Z_STREAM_END;
}

// A compressed gRPC message (flag 1), framed, made plain.
Status Decompress(const std::string& encoding, std::string* framed) {
  if (encoding != "gzip" && encoding != "deflate")
    return {kUnimplemented, "grpc-encoding '" + encoding + "' is not supported through the "
                            "router (gzip and deflate are)"};
  std::string message;
  if (!Inflate(framed->substr(kFrameHeader), encoding == "gzip", &message))
    return {kInternal, "the request does not decompress as " + encoding};
  *framed = Framed(message);
  return {};
}

// Up to `length` bytes of `outbox` from `*offset` into `buffer` (a data provider's read).
ssize_t TakeOut(std::string* outbox, size_t* offset, uint8_t* buffer, size_t length) {
  size_t n = std::min(length, outbox->size() - *offset);
  memcpy(buffer, outbox->data() + *offset, n);
  *offset += n;
  if (*offset == outbox->size()) {
    outbox->clear();
    *offset = 0;
  }
  return static_cast<ssize_t>(n);
}

bool SkippedRequestHeader(const std::string& name) {
  // Set per hop (pseudo-headers, te, content-type, grpc-*), or not to be passed on.
  return name.empty() || name[0] == ':' || name == "te" || name == "content-type" ||
         name.rfind("grpc-", 0) == 0 || name == "user-agent" || name == "connection" ||
         name == "host";
}

class Proxy;
Proxy* g_proxy = nullptr;  // the running proxy; used on the event-loop thread only

class Proxy {
 public:
  Proxy(std::string control, bool retry) : control_(std::move(control)), retry_(retry) {}

  ~Proxy() {
    for (int fd : {listen_fd_, epoll_fd_})
      if (fd >= 0) close(fd);
    nghttp2_session_callbacks_del(server_callbacks_);
    nghttp2_session_callbacks_del(client_callbacks_);
  }

  bool Start(const std::string& listen, int* port, std::string* error) {
    epoll_fd_ = epoll_create1(EPOLL_CLOEXEC);
    if (epoll_fd_ < 0) {
      *error = strerror(errno);
      return false;
    }
    if (!Listen(listen, port, error)) return false;
    Watch(listen_fd_, EPOLLIN, false);
    return true;
  }

  // Readable whenever a socket of the proxy is: the event loop watches it and calls Poll.
  int epoll_fd() const { return epoll_fd_; }

  // Everything ready now, without waiting. What it produces goes out with the next
  // Settle, so that the decisions taken on its events leave in the same writes.
  void Poll() {
    epoll_event ready[128];
    int n = epoll_wait(epoll_fd_, ready, 128, 0);
    for (int i = 0; i < n; ++i) {
      int fd = ready[i].data.fd;
      uint32_t events = ready[i].events;
      if (fd == listen_fd_) {
        Accept();
      } else if (auto it = connections_.find(fd); it != connections_.end()) {
        Connection* conn = it->second.get();
        if (events & (EPOLLIN | EPOLLHUP | EPOLLERR)) Receive(conn);
        if (!conn->closed && (events & EPOLLOUT)) {
          if (conn->connecting) Connected(conn);
          MarkDirty(conn);
        }
      }
    }
  }

  void Apply(Decision decision) {
    auto found = awaiting_.find(decision.id);
    if (decision.kind == Decision::kStop) {
      BeginStop();
    } else if (found == awaiting_.end()) {
      // Answered already (the router began to stop while Python queued it): a forward
      // took a seat, which its "ended" event gives back.
      if (decision.kind == Decision::kForward) {
        Event event{kEnded, decision.id};
        event.status = kCancelled;
        event.details = "the router is shutting down";
        PushEvent(std::move(event));
      }
    } else {
      Call* call = found->second;
      awaiting_.erase(found);
      call->request_id = std::move(decision.request_id);
      call->model = std::move(decision.model);
      call->wants_empty_final = decision.wants_empty_final;
      if (decision.kind == Decision::kForward)
        Forward(call, decision.address);
      else
        End(call, Status{decision.code, decision.message});  // never seated: no event
    }
  }

  std::vector<Event> TakeEvents() {
    std::vector<Event> taken;
    taken.swap(events_);
    return taken;
  }

  size_t ActiveStreams() const {
    size_t count = 0;
    for (const auto& [fd, conn] : connections_)
      if (!conn->upstream && !conn->closed) count += conn->downstreams.size();
    return count;
  }

  // The end: every connection closed; instances first, so their requests end (and Python
  // hears of it) before the clients go.
  void CloseAll() {
    BeginStop();  // no retries from here on: nobody would route them
    std::vector<Connection*> open;
    for (auto& [fd, conn] : connections_) open.push_back(conn.get());
    std::stable_partition(open.begin(), open.end(), [](Connection* c) { return c->upstream; });
    for (Connection* conn : open) Close(conn, "the router is shutting down");
    Settle();
  }

 private:
  // ---- sockets and the loop ----------------------------------------------------------
  // host:port (host may be [v6], or empty to listen everywhere) for a TCP socket.
  static addrinfo* Resolve(const std::string& address, bool passive, std::string* error) {
    auto colon = address.rfind(':');
    if (colon == std::string::npos) {
      *error = "expected host:port, got " + address;
      return nullptr;
    }
    std::string host = address.substr(0, colon), service = address.substr(colon + 1);
    if (host.size() > 1 && host.front() == '[') host = host.substr(1, host.size() - 2);
    addrinfo hints{}, *found = nullptr;
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = passive ? AI_PASSIVE : 0;
    if (int rc = getaddrinfo(host.empty() ? nullptr : host.c_str(), service.c_str(), &hints,
                             &found)) {
      *error = "cannot resolve " + address + ": " + gai_strerror(rc);
      return nullptr;
    }
    return found;
  }

  bool Listen(const std::string& listen, int* port, std::string* error) {
    addrinfo* found = Resolve(listen, true, error);
    if (found == nullptr) return false;
    for (addrinfo* ai = found; ai != nullptr; ai = ai->ai_next) {
      int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
      if (fd < 0) continue;
      int yes = 1;
      setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));
      if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && ::listen(fd, 1024) == 0) {
        sockaddr_storage bound{};
        socklen_t size = sizeof(bound);
        getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &size);
        *port = ntohs(bound.ss_family == AF_INET6
                          ? reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port
                          : reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
        listen_fd_ = fd;
        break;
      }
      *error = strerror(errno);
      close(fd);
    }
    freeaddrinfo(found);
    return listen_fd_ >= 0;
  }

  void Watch(int fd, uint32_t events, bool modify) {
    epoll_event ev{};
    ev.events = events;
    ev.data.fd = fd;
    epoll_ctl(epoll_fd_, modify ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, fd, &ev);
  }

 public:
  // Write what is pending on every connection; free the connections that closed.
  void Settle() {
    FlushDirty();
    graveyard_.clear();
  }

 private:

  void Accept() {
    while (true) {
      int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (fd < 0) return;
      int yes = 1;
      setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &yes, sizeof(yes));
      auto conn = std::make_unique<Connection>();
      conn->fd = fd;
      nghttp2_session_server_new(&conn->session, server_callbacks_, conn.get());
      Configure(conn.get());
      Watch(fd, EPOLLIN, false);
      MarkDirty(conn.get());
      connections_[fd] = std::move(conn);
    }
  }

  void Configure(Connection* conn) {
    nghttp2_settings_entry settings[] = {
        {NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, 4096},
        {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, kWindow},
        {NGHTTP2_SETTINGS_ENABLE_PUSH, 0},
    };
    // A server may not send ENABLE_PUSH; a client may not send MAX_CONCURRENT_STREAMS
    // usefully: each side sends what applies to it.
    if (conn->upstream) {
      nghttp2_settings_entry client[] = {settings[1], settings[2]};
      nghttp2_submit_settings(conn->session, NGHTTP2_FLAG_NONE, client, 2);
    } else {
      nghttp2_submit_settings(conn->session, NGHTTP2_FLAG_NONE, settings, 2);
    }
    nghttp2_session_set_local_window_size(conn->session, NGHTTP2_FLAG_NONE, 0, kWindow);
  }

  Connection* Upstream(const std::string& address, std::string* error) {
    if (auto it = upstreams_.find(address); it != upstreams_.end()) {
      if (!it->second->closed && !it->second->retiring) return it->second;
      upstreams_.erase(it);
    }
    addrinfo* found = Resolve(address, false, error);
    if (found == nullptr) return nullptr;
    int fd = socket(found->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int rc = fd < 0 ? -1 : connect(fd, found->ai_addr, found->ai_addrlen);
    int saved = errno;
    freeaddrinfo(found);
    if (fd < 0 || (rc < 0 && saved != EINPROGRESS)) {
      *error = std::string("failed to connect to ") + address + ": " + strerror(saved);
      if (fd >= 0) close(fd);
      return nullptr;
    }
    int yes = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &yes, sizeof(yes));
    auto conn = std::make_unique<Connection>();
    conn->fd = fd;
    conn->upstream = true;
    conn->address = address;
    conn->connecting = rc < 0;
    nghttp2_session_client_new(&conn->session, client_callbacks_, conn.get());
    Configure(conn.get());
    Watch(fd, EPOLLIN | (conn->connecting ? uint32_t{EPOLLOUT} : 0u), false);
    conn->writable_watch = conn->connecting;
    Connection* raw = conn.get();
    connections_[fd] = std::move(conn);
    upstreams_[address] = raw;
    MarkDirty(raw);
    return raw;
  }

  void Connected(Connection* conn) {
    int error = 0;
    socklen_t size = sizeof(error);
    getsockopt(conn->fd, SOL_SOCKET, SO_ERROR, &error, &size);
    if (error != 0) {
      Close(conn, std::string("failed to connect to ") + conn->address + ": " + strerror(error));
      return;
    }
    conn->connecting = false;
  }

  void Receive(Connection* conn) {
    uint8_t buffer[65536];
    while (!conn->closed) {
      ssize_t n = read(conn->fd, buffer, sizeof(buffer));
      if (n > 0) {
        ssize_t used = nghttp2_session_mem_recv(conn->session, buffer, static_cast<size_t>(n));
        if (used < 0) {
          Close(conn, std::string("HTTP/2 error: ") + nghttp2_strerror(static_cast<int>(used)));
          return;
        }
        MarkDirty(conn);
        // Level-triggered epoll reports what is left; a short read means the socket is
        // drained, so skip the read that would only say EAGAIN.
        if (static_cast<size_t>(n) < sizeof(buffer)) return;
        continue;
      }
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
      if (n < 0 && errno == EINTR) continue;
      Close(conn, n == 0 ? "connection closed by peer" : strerror(errno));
      return;
    }
  }

  void MarkDirty(Connection* conn) {
    if (conn->closed || conn->dirty) return;
    conn->dirty = true;
    dirty_.push_back(conn);
  }

  void FlushDirty() {
    // Flushing one connection can make another dirty (a relayed response).
    for (size_t i = 0; i < dirty_.size(); ++i) {
      Connection* conn = dirty_[i];
      conn->dirty = false;
      if (!conn->closed) Flush(conn);
    }
    dirty_.clear();
  }

  void Flush(Connection* conn) {
    if (conn->connecting) return;
    while (true) {
      const uint8_t* data;
      ssize_t n;
      while ((n = nghttp2_session_mem_send(conn->session, &data)) > 0)
        conn->pending.append(reinterpret_cast<const char*>(data), static_cast<size_t>(n));
      if (n < 0) {
        Close(conn, std::string("HTTP/2 error: ") + nghttp2_strerror(static_cast<int>(n)));
        return;
      }
      if (conn->pending.empty()) break;
      ssize_t written = send(conn->fd, conn->pending.data(), conn->pending.size(), MSG_NOSIGNAL);
      if (written < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) break;
        if (errno == EINTR) continue;
        Close(conn, strerror(errno));
        return;
      }
      conn->pending.erase(0, static_cast<size_t>(written));
      if (!conn->pending.empty()) break;
      if (!nghttp2_session_want_write(conn->session)) break;
    }
    bool want_writable = !conn->pending.empty();
    if (want_writable != conn->writable_watch) {
      conn->writable_watch = want_writable;
      Watch(conn->fd, EPOLLIN | (want_writable ? uint32_t{EPOLLOUT} : 0u), true);
    }
    if (!conn->upstream && !nghttp2_session_want_read(conn->session) &&
        !nghttp2_session_want_write(conn->session) && conn->pending.empty())
      Close(conn, "session ended");
  }

  void Close(Connection* conn, const std::string& reason) {
    if (conn->closed) return;
    conn->closed = true;
    epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, conn->fd, nullptr);
    close(conn->fd);
    if (conn->upstream) {
      if (auto it = upstreams_.find(conn->address); it != upstreams_.end() && it->second == conn)
        upstreams_.erase(it);
      auto shared = conn->shared;
      conn->shared.clear();
      for (Shared* stream : shared) {
        nghttp2_session_set_stream_user_data(conn->session, stream->up_stream, nullptr);
        stream->up = nullptr;
        SharedClosed(stream, Status{kUnavailable, "connection to " + conn->address +
                                                      " lost: " + reason});
      }
      auto calls = conn->calls;
      conn->calls.clear();
      for (Call* call : calls) {
        nghttp2_session_set_stream_user_data(conn->session, call->up_stream, nullptr);
        call->up = nullptr;
        UpstreamDone(call, call->cancel_requested
                               ? Status{kCancelled, "cancelled"}
                               : Status{kUnavailable, "connection to " + conn->address +
                                                          " lost: " + reason});
      }
    } else {
      auto downstreams = conn->downstreams;
      conn->downstreams.clear();
      for (Downstream* down : downstreams) {
        nghttp2_session_set_stream_user_data(conn->session, down->id, nullptr);
        down->conn = nullptr;
        DownstreamClosed(down, true);
      }
    }
    auto node = connections_.extract(conn->fd);
    if (!node.empty()) graveyard_.push_back(std::move(node.mapped()));
  }


  // ---- stopping ------------------------------------------------------------------------
  void BeginStop() {
    if (stopping_) return;
    stopping_ = true;
    epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, listen_fd_, nullptr);
    close(listen_fd_);
    listen_fd_ = -1;
    auto waiting = std::move(awaiting_);
    awaiting_.clear();
    for (auto& [id, call] : waiting) End(call, Status{kUnavailable, "the router is shutting down"});
  }

  void PushEvent(Event event) { events_.push_back(std::move(event)); }

  // ---- client streams ------------------------------------------------------------------
  Downstream* NewDownstream(Connection* conn, int32_t id) {
    auto* down = new Downstream{conn, id};
    conn->downstreams.insert(down);
    nghttp2_session_set_stream_user_data(conn->session, id, down);
    return down;
  }

  void RequestHeader(Downstream* down, std::string name, std::string value) {
    if (name == ":path") {
      down->path = std::move(value);
      down->kind = down->path == kModelInfer        ? Kind::kUnaryInfer
                   : down->path == kModelStreamInfer ? Kind::kStreamInfer
                                                     : Kind::kPassthrough;
    } else if (name == "grpc-timeout") {
      if (auto timeout = ParseGrpcTimeout(value)) down->deadline = Clock::now() + *timeout;
    } else if (name == "grpc-encoding") {
      down->encoding = std::move(value);
    } else if (!SkippedRequestHeader(name)) {
      down->metadata.emplace_back(std::move(name), std::move(value));
    }
  }

  void RequestData(Downstream* down, const uint8_t* data, size_t length) {
    down->inbuf.append(reinterpret_cast<const char*>(data), length);
    if (down->kind != Kind::kStreamInfer) return;
    for (auto& message : TakeMessages(&down->inbuf)) NewCall(down, std::move(message));
  }

  void RequestEnded(Downstream* down) {
    down->client_done = true;
    if (down->kind == Kind::kStreamInfer) {
      if (!down->inbuf.empty())
        Respond(down, Status{kInternal, "the stream ended inside a gRPC message"});
      MaybeFinishStream(down);
      return;
    }
    std::string request = std::move(down->inbuf);
    down->inbuf.clear();
    if (down->kind == Kind::kPassthrough) {
      auto* call = NewCallObject(down, std::move(request), false);
      Forward(call, control_);
      return;
    }
    auto messages = TakeMessages(&request);
    if (messages.size() != 1 || !request.empty()) {
      Respond(down, Status{kInternal, "ModelInfer expects exactly one request message"});
      return;
    }
    NewCall(down, std::move(messages[0]));
  }

  Call* NewCallObject(Downstream* down, std::string framed, bool routed) {
    auto* call = new Call{};
    call->down = down;
    call->routed = routed;
    call->streaming = down->kind == Kind::kStreamInfer;
    call->framed = std::move(framed);
    down->calls.insert(call);
    return call;
  }

  // A request to route: ask Python. A compressed one is decompressed here (routing reads
  // it) and goes on uncompressed.
  void NewCall(Downstream* down, std::string framed) {
    if (framed[0] != 0) {
      Status status = Decompress(down->encoding, &framed);
      if (!status.ok()) {
        if (down->kind == Kind::kStreamInfer)
          AppendMessage(down, StreamErrorResponse(status.message, "", ""));
        else
          Respond(down, status);
        return;
      }
    }
    Call* call = NewCallObject(down, std::move(framed), true);
    if (stopping_) {
      End(call, Status{kUnavailable, "the router is shutting down"});
      return;
    }
    call->id = next_id_++;
    awaiting_[call->id] = call;
    Event event{kRoute, call->id};
    event.request = call->framed.substr(kFrameHeader);
    event.metadata = down->metadata;
    event.streaming = call->streaming;
    if (down->deadline)
      event.time_remaining_s =
          std::chrono::duration<double>(*down->deadline - Clock::now()).count();
    PushEvent(std::move(event));
  }

  // The client reset its stream, or its connection went away.
  void DownstreamClosed(Downstream* down, bool abnormal) {
    down->closed = true;
    if (abnormal || !down->calls.empty()) down->cancelled = true;
    for (Call* call : std::vector<Call*>(down->calls.begin(), down->calls.end())) Cancel(call);
    CloseShared(down, down->cancelled);
    MaybeDelete(down);
  }

  void MaybeDelete(Downstream* down) {
    if (down->closed && down->calls.empty() && down->shared.empty() && down->ending.empty())
      delete down;
  }

  // ---- to the client -------------------------------------------------------------------
  static ssize_t ReadResponse(nghttp2_session* session, int32_t stream_id, uint8_t* buffer,
                              size_t length, uint32_t* flags, nghttp2_data_source* source,
                              void*) {
    auto* down = static_cast<Downstream*>(source->ptr);
    size_t available = down->outbox.size() - down->out_off;
    if (available == 0) {
      if (!down->finishing) {
        down->deferred = true;
        return NGHTTP2_ERR_DEFERRED;
      }
      *flags |= NGHTTP2_DATA_FLAG_EOF;
      if (!down->trailers.empty()) {
        *flags |= NGHTTP2_DATA_FLAG_NO_END_STREAM;
        auto nva = NameValues(down->trailers);
        nghttp2_submit_trailer(session, stream_id, nva.data(), nva.size());
      }
      return 0;
    }
    return TakeOut(&down->outbox, &down->out_off, buffer, length);
  }

  static std::vector<nghttp2_nv> NameValues(const Headers& headers) {
    std::vector<nghttp2_nv> nva;
    nva.reserve(headers.size());
    for (const auto& [name, value] : headers)
      nva.push_back({reinterpret_cast<uint8_t*>(const_cast<char*>(name.data())),
                     reinterpret_cast<uint8_t*>(const_cast<char*>(value.data())), name.size(),
                     value.size(), NGHTTP2_NV_FLAG_NONE});
    return nva;
  }

  bool Writable(Downstream* down) const {
    return !down->closed && !down->cancelled && down->conn != nullptr && !down->finishing;
  }

  void StartResponse(Downstream* down, const Headers& headers) {
    down->response_started = true;
    nghttp2_data_provider provider{};
    provider.source.ptr = down;
    provider.read_callback = &Proxy::ReadResponse;
    auto nva = NameValues(headers);
    nghttp2_submit_response(down->conn->session, down->id, nva.data(), nva.size(), &provider);
    MarkDirty(down->conn);
  }

  void Resume(Downstream* down) {
    if (down->deferred) {
      down->deferred = false;
      nghttp2_session_resume_data(down->conn->session, down->id);
    }
    MarkDirty(down->conn);
  }

  // One whole gRPC message onto a stream's response.
  void AppendFramed(Downstream* down, const std::string& framed) {
    if (!Writable(down)) return;
    if (!down->response_started)
      StartResponse(down, {{":status", "200"}, {"content-type", "application/grpc"}});
    down->outbox += framed;
    Resume(down);
  }

  void AppendMessage(Downstream* down, const std::string& message) {
    AppendFramed(down, Framed(message));
  }

  // The whole answer to a stream: a status (trailers), after what was written.
  void Respond(Downstream* down, const Status& status) {
    if (!Writable(down)) return;
    Headers trailers{{"grpc-status", std::to_string(status.code)}};
    if (!status.message.empty()) trailers.emplace_back("grpc-message", PercentEncode(status.message));
    if (!down->response_started) {  // trailers-only
      Headers headers{{":status", "200"}, {"content-type", "application/grpc"}};
      headers.insert(headers.end(), trailers.begin(), trailers.end());
      auto nva = NameValues(headers);
      nghttp2_submit_response(down->conn->session, down->id, nva.data(), nva.size(), nullptr);
      down->response_started = true;
      down->finishing = true;
      MarkDirty(down->conn);
      return;
    }
    down->trailers = std::move(trailers);
    down->finishing = true;
    Resume(down);
  }

  // A unary call's answer, as the instance sent it.
  void Relay(Downstream* down, Call* call) {
    if (!Writable(down)) return;
    Headers headers;
    for (auto& header : call->response_headers)
      if (header.first == ":status" || header.first[0] != ':') headers.push_back(header);
    if (call->body.empty() && call->response_trailers.empty()) {  // trailers-only
      auto nva = NameValues(headers);
      nghttp2_submit_response(down->conn->session, down->id, nva.data(), nva.size(), nullptr);
      down->response_started = down->finishing = true;
      MarkDirty(down->conn);
      return;
    }
    StartResponse(down, headers);
    down->outbox = std::move(call->body);
    down->out_off = 0;
    down->trailers = std::move(call->response_trailers);
    down->finishing = true;
    Resume(down);
  }

  void MaybeFinishStream(Downstream* down) {
    if (down->kind == Kind::kStreamInfer && down->client_done && down->calls.empty()) {
      Respond(down, Status{kOk, ""});
      CloseShared(down, false);
    }
  }

  // ---- to the instances ----------------------------------------------------------------
  static ssize_t ReadRequest(nghttp2_session*, int32_t, uint8_t* buffer, size_t length,
                             uint32_t* flags, nghttp2_data_source* source, void*) {
    auto* call = static_cast<Call*>(static_cast<Upstreamed*>(source->ptr));
    size_t n = std::min(length, call->framed.size() - call->sent);
    memcpy(buffer, call->framed.data() + call->sent, n);
    call->sent += n;
    if (call->sent == call->framed.size()) *flags |= NGHTTP2_DATA_FLAG_EOF;
    return static_cast<ssize_t>(n);
  }

  // A new upstream stream for `source` (a Call or a Shared), or -1 and why not.
  int32_t OpenStream(Downstream* down, const std::string& address, Upstreamed* source,
                     nghttp2_data_source_read_callback read, Connection** opened,
                     Status* failure) {
    Headers headers{{":method", "POST"}, {":scheme", "http"}, {":path", down->path},
                    {":authority", address}, {"content-type", "application/grpc"},
                    {"te", "trailers"}};
    if (down->deadline) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(*down->deadline -
                                                                        Clock::now());
      if (left.count() <= 0) {
        *failure = {kDeadlineExceeded, "the deadline passed before the request reached an "
                                       "instance"};
        return -1;
      }
      headers.emplace_back("grpc-timeout", std::to_string(left.count()) + "m");
    }
    headers.insert(headers.end(), down->metadata.begin(), down->metadata.end());
    if (down->kind == Kind::kPassthrough && !down->encoding.empty())
      headers.emplace_back("grpc-encoding", down->encoding);  // relayed unread
    auto nva = NameValues(headers);
    for (int attempt = 0; attempt < 2; ++attempt) {
      std::string error;
      Connection* conn = Upstream(address, &error);
      if (conn == nullptr) {
        *failure = {kUnavailable, error};
        return -1;
      }
      nghttp2_data_provider provider{};
      provider.source.ptr = source;
      provider.read_callback = read;
      int32_t id = nghttp2_submit_request(conn->session, nullptr, nva.data(), nva.size(),
                                          &provider, source);
      if (id >= 0) {
        *opened = conn;
        MarkDirty(conn);
        return id;
      }
      // Stream ids used up, or the instance sent GOAWAY: a fresh connection takes it.
      conn->retiring = true;
      upstreams_.erase(address);
    }
    *failure = {kUnavailable, "cannot open a stream to " + address};
    return -1;
  }

  void Forward(Call* call, const std::string& address) {
    Downstream* down = call->down;
    if (down->cancelled || down->closed) {
      Finish(call, Status{kCancelled, "the client cancelled the request"});
      return;
    }
    call->address = address;
    Status failure;
    if (call->streaming && !call->request_id.empty()) {
      Shared* shared = SharedStream(down, address, &failure);
      if (shared != nullptr && !shared->pending.count(call->request_id)) {
        SendOnShared(shared, call);
        return;
      }
      // Without a stream there, or with this id already in flight on it (responses are
      // matched by id): a stream of its own.
    }
    if (failure.ok()) {
      call->sent = 0;
      Connection* conn = nullptr;
      int32_t id = OpenStream(down, address, call, &Proxy::ReadRequest, &conn, &failure);
      if (id >= 0) {
        call->up = conn;
        call->up_stream = id;
        conn->calls.insert(call);
        return;
      }
    }
    if (failure.code == kUnavailable)
      UpstreamDone(call, failure);
    else
      Finish(call, failure);
  }

  Shared* SharedStream(Downstream* down, const std::string& address, Status* failure) {
    if (auto it = down->shared.find(address); it != down->shared.end()) {
      Shared* shared = it->second;
      if (!shared->closing && shared->up != nullptr && !shared->up->closed) return shared;
      down->ending.insert(shared);  // it leaves when its stream closes (SharedClosed)
      down->shared.erase(it);
    }
    auto* shared = new Shared();
    shared->down = down;
    shared->address = address;
    Connection* conn = nullptr;
    int32_t id = OpenStream(down, address, shared, &Proxy::ReadShared, &conn, failure);
    if (id < 0) {
      delete shared;
      return nullptr;
    }
    shared->up = conn;
    shared->up_stream = id;
    conn->shared.insert(shared);
    down->shared[address] = shared;
    return shared;
  }

  void SendOnShared(Shared* shared, Call* call) {
    std::string framed = call->framed;
    if (!call->wants_empty_final) {
      framed += AskEmptyFinal();
      uint32_t length = htonl(static_cast<uint32_t>(framed.size() - kFrameHeader));
      memcpy(&framed[1], &length, 4);
    }
    shared->outbox += framed;
    shared->pending[call->request_id] = call;
    call->via = shared;
    ResumeShared(shared);
  }

  void ResumeShared(Shared* shared) {
    if (shared->up == nullptr) return;
    if (shared->deferred) {
      shared->deferred = false;
      nghttp2_session_resume_data(shared->up->session, shared->up_stream);
    }
    MarkDirty(shared->up);
  }

  static ssize_t ReadShared(nghttp2_session*, int32_t, uint8_t* buffer, size_t length,
                            uint32_t* flags, nghttp2_data_source* source, void*) {
    auto* shared = static_cast<Shared*>(static_cast<Upstreamed*>(source->ptr));
    size_t available = shared->outbox.size() - shared->out_off;
    if (available == 0) {
      if (shared->closing) {
        *flags |= NGHTTP2_DATA_FLAG_EOF;
        return 0;
      }
      shared->deferred = true;
      return NGHTTP2_ERR_DEFERRED;
    }
    return TakeOut(&shared->outbox, &shared->out_off, buffer, length);
  }

  void SharedData(Shared* shared, const uint8_t* data, size_t length) {
    shared->partial.append(reinterpret_cast<const char*>(data), length);
    for (auto& framed : TakeMessages(&shared->partial)) {
      ResponseFacts facts;
      bool parsed = ReadResponseFacts(framed, &facts);
      Call* call = nullptr;
      if (auto it = shared->pending.find(facts.id); parsed && it != shared->pending.end())
        call = it->second;
      else if (shared->pending.size() == 1)
        call = shared->pending.begin()->second;
      if (call == nullptr) {  // not a request the router is waiting on: relay it as it came
        AppendFramed(shared->down, framed);
        continue;
      }
      bool final = parsed && facts.final();
      if (!(final && facts.empty() && !call->wants_empty_final)) {
        if (call->responses++ == 0) call->first_response = Clock::now();
        if (facts.error) call->error_in_stream = true;
        AppendFramed(shared->down, framed);
      }
      if (final) {
        shared->pending.erase(call->request_id);
        call->via = nullptr;
        Finish(call, Status{});
      }
    }
  }

  // A shared stream is over (its instance ended it, or the connection went): whatever it
  // still carried lost its instance.
  void SharedClosed(Shared* shared, Status status) {
    if (shared->up != nullptr) shared->up->shared.erase(shared);
    Downstream* down = shared->down;
    if (auto it = down->shared.find(shared->address); it != down->shared.end() &&
                                                      it->second == shared)
      down->shared.erase(it);
    down->ending.erase(shared);
    if (status.ok())
      status = {kUnavailable, "instance " + shared->address +
                                  " ended the stream before the request's last response"};
    auto pending = std::move(shared->pending);
    bool cancelled = shared->cancel_requested;
    delete shared;
    for (auto& [id, call] : pending) {
      call->via = nullptr;
      UpstreamDone(call, cancelled || call->cancel_requested ? Status{kCancelled, "cancelled"}
                                                             : status);
    }
    if (pending.empty()) MaybeDelete(down);  // else the last request's end did
  }

  void CloseShared(Downstream* down, bool cancel) {
    std::vector<Shared*> streams(down->ending.begin(), down->ending.end());
    for (auto& [address, shared] : down->shared) streams.push_back(shared);
    for (Shared* shared : streams) {
      if (cancel && shared->up != nullptr) {
        shared->cancel_requested = true;
        nghttp2_submit_rst_stream(shared->up->session, NGHTTP2_FLAG_NONE, shared->up_stream,
                                  NGHTTP2_CANCEL);
        MarkDirty(shared->up);
      } else if (!shared->closing) {
        shared->closing = true;  // the client is done: end the stream after what is queued
        ResumeShared(shared);
      }
    }
  }

  void Cancel(Call* call) {
    call->cancel_requested = true;  // one on a shared stream ends with that stream's reset
    if (call->up != nullptr && call->up_stream > 0) {
      nghttp2_submit_rst_stream(call->up->session, NGHTTP2_FLAG_NONE, call->up_stream,
                                NGHTTP2_CANCEL);
      MarkDirty(call->up);
    }
  }

  void ResponseHeader(Call* call, const nghttp2_frame* frame, std::string name,
                      std::string value) {
    ReadStatus(&call->grpc_status, name, value);
    bool trailers = frame->headers.cat == NGHTTP2_HCAT_HEADERS;
    (trailers ? call->response_trailers : call->response_headers)
        .emplace_back(std::move(name), std::move(value));
    call->answered = true;
  }

  void ResponseData(Call* call, const uint8_t* data, size_t length) {
    call->partial.append(reinterpret_cast<const char*>(data), length);
    for (auto& framed : TakeMessages(&call->partial)) {
      if (call->responses++ == 0) call->first_response = Clock::now();
      if (!call->streaming) {
        call->body += framed;
        continue;
      }
      // A ModelStreamInferResponse's error_message is field 1: serialized first when set.
      if (framed.size() > kFrameHeader && framed[kFrameHeader] == 0x0A)
        call->error_in_stream = true;
      AppendFramed(call->down, framed);
    }
  }

  static void ReadStatus(std::optional<Status>* status, const std::string& name,
                         const std::string& value) {
    if (name == "grpc-status") {
      if (!*status) *status = Status{};
      (*status)->code = atoi(value.c_str());
    } else if (name == "grpc-message") {
      if (!*status) *status = Status{kUnavailable, ""};
      (*status)->message = PercentDecode(value);
    }
  }

  void SharedHeader(Shared* shared, const std::string& name, const std::string& value) {
    ReadStatus(&shared->grpc_status, name, value);
  }

  void SharedStreamClosed(Shared* shared, uint32_t error_code) {
    Status status;
    if (shared->grpc_status)
      status = *shared->grpc_status;
    else if (shared->cancel_requested)
      status = {kCancelled, "cancelled"};
    else
      status = {kUnavailable, "instance " + shared->address +
                                  " reset the stream (HTTP/2 error " +
                                  std::to_string(error_code) + ")"};
    SharedClosed(shared, status);
  }

  void StreamClosed(Call* call, uint32_t error_code) {
    if (call->up != nullptr) call->up->calls.erase(call);
    call->up = nullptr;
    Status status;
    if (call->grpc_status) {
      status = *call->grpc_status;
    } else if (call->cancel_requested) {
      status = {kCancelled, "cancelled"};
    } else {
      status = {kUnavailable, "instance " + call->address + " reset the stream (HTTP/2 error " +
                                  std::to_string(error_code) + ")"};
    }
    UpstreamDone(call, status);
  }

  void UpstreamDone(Call* call, const Status& status) {
    Downstream* down = call->down;
    bool retry = call->routed && !status.ok() && status.code == kUnavailable &&
                 call->responses == 0 && !call->retried && retry_ && !stopping_ &&
                 !call->cancel_requested && !down->cancelled && !down->closed;
    if (!retry) {
      Finish(call, status);
      return;
    }
    call->retried = true;
    call->answered = false;
    call->response_headers.clear();
    call->response_trailers.clear();
    call->body.clear();
    call->partial.clear();
    call->grpc_status.reset();
    awaiting_[call->id] = call;
    Event event{kLost, call->id};
    event.status = status.code;
    event.details = status.message;
    PushEvent(std::move(event));
  }

  // The request is over: Python frees its seat and records it; the client gets the end.
  void Finish(Call* call, const Status& status) {
    if (call->routed) {
      Event event{kEnded, call->id};
      event.status = status.code;
      event.details = status.message;
      event.responses = call->responses;
      auto now = Clock::now();
      event.latency_s = std::chrono::duration<double>(now - call->started).count();
      if (call->first_response)
        event.ttft_s = std::chrono::duration<double>(*call->first_response - call->started).count();
      event.error_in_stream = call->error_in_stream;
      PushEvent(std::move(event));
    }
    End(call, status);
  }

  void End(Call* call, const Status& status) {
    Downstream* down = call->down;
    down->calls.erase(call);
    if (down->kind == Kind::kStreamInfer) {
      if (!status.ok() && status.code != kCancelled && Writable(down))
        AppendMessage(down, StreamErrorResponse(ErrorText(call, status), call->request_id,
                                                call->model));
      MaybeFinishStream(down);
    } else if (call->answered && call->grpc_status) {  // the instance's whole answer
      Relay(down, call);
    } else {
      Respond(down, status);
    }
    delete call;
    MaybeDelete(down);
  }

  static std::string ErrorText(const Call* call, const Status& status) {
    if (call->address.empty() || status.code != kUnavailable) return status.message;
    if (call->responses == 0) return "instance " + call->address + " failed: " + status.message;
    return "instance " + call->address + " failed after " + std::to_string(call->responses) +
           " response(s) (" + status.message + "); the request was not restarted";
  }

  // ---- nghttp2 callbacks ---------------------------------------------------------------
 public:

  static int OnBeginHeaders(nghttp2_session*, const nghttp2_frame* frame, void* user) {
    auto* conn = static_cast<Connection*>(user);
    if (!conn->upstream && frame->hd.type == NGHTTP2_HEADERS &&
        frame->headers.cat == NGHTTP2_HCAT_REQUEST)
      g_proxy->NewDownstream(conn, frame->hd.stream_id);
    return 0;
  }

  static int OnHeader(nghttp2_session* session, const nghttp2_frame* frame, const uint8_t* name,
                      size_t name_length, const uint8_t* value, size_t value_length, uint8_t,
                      void* user) {
    auto* conn = static_cast<Connection*>(user);
    void* stream = nghttp2_session_get_stream_user_data(session, frame->hd.stream_id);
    if (stream == nullptr) return 0;
    std::string key(reinterpret_cast<const char*>(name), name_length);
    std::string text(reinterpret_cast<const char*>(value), value_length);
    if (conn->upstream) {
      auto* upstream = static_cast<Upstreamed*>(stream);
      if (upstream->shared)
        g_proxy->SharedHeader(static_cast<Shared*>(upstream), key, text);
      else
        g_proxy->ResponseHeader(static_cast<Call*>(upstream), frame, std::move(key),
                                        std::move(text));
    } else
      g_proxy->RequestHeader(static_cast<Downstream*>(stream), std::move(key),
                                     std::move(text));
    return 0;
  }

  static int OnFrameReceived(nghttp2_session* session, const nghttp2_frame* frame, void* user) {
    auto* conn = static_cast<Connection*>(user);
    if (frame->hd.type == NGHTTP2_GOAWAY && conn->upstream) {
      conn->retiring = true;  // finish what is open, start nothing new here
      return 0;
    }
    if (!(frame->hd.flags & NGHTTP2_FLAG_END_STREAM)) return 0;
    if (frame->hd.type != NGHTTP2_DATA && frame->hd.type != NGHTTP2_HEADERS) return 0;
    void* stream = nghttp2_session_get_stream_user_data(session, frame->hd.stream_id);
    if (conn->upstream) {
      // The instance ended a shared stream (its trailers): end ours as well, so that the
      // stream closes and what it still carried is settled, and send nothing more on it.
      auto* upstream = static_cast<Upstreamed*>(stream);
      if (upstream != nullptr && upstream->shared) {
        auto* shared = static_cast<Shared*>(upstream);
        shared->closing = true;
        g_proxy->ResumeShared(shared);
      }
      return 0;
    }
    if (stream != nullptr) g_proxy->RequestEnded(static_cast<Downstream*>(stream));
    return 0;
  }

  static int OnDataChunk(nghttp2_session* session, uint8_t, int32_t stream_id,
                         const uint8_t* data, size_t length, void* user) {
    auto* conn = static_cast<Connection*>(user);
    void* stream = nghttp2_session_get_stream_user_data(session, stream_id);
    if (stream == nullptr) return 0;
    if (conn->upstream) {
      auto* upstream = static_cast<Upstreamed*>(stream);
      if (upstream->shared)
        g_proxy->SharedData(static_cast<Shared*>(upstream), data, length);
      else
        g_proxy->ResponseData(static_cast<Call*>(upstream), data, length);
    } else
      g_proxy->RequestData(static_cast<Downstream*>(stream), data, length);
    return 0;
  }

  static int OnStreamClose(nghttp2_session* session, int32_t stream_id, uint32_t error_code,
                           void* user) {
    auto* conn = static_cast<Connection*>(user);
    void* stream = nghttp2_session_get_stream_user_data(session, stream_id);
    if (stream == nullptr) return 0;
    nghttp2_session_set_stream_user_data(session, stream_id, nullptr);
    if (conn->upstream) {
      auto* upstream = static_cast<Upstreamed*>(stream);
      if (upstream->shared)
        g_proxy->SharedStreamClosed(static_cast<Shared*>(upstream), error_code);
      else
        g_proxy->StreamClosed(static_cast<Call*>(upstream), error_code);
    } else {
      auto* down = static_cast<Downstream*>(stream);
      conn->downstreams.erase(down);
      down->conn = nullptr;
      g_proxy->DownstreamClosed(down, error_code != NGHTTP2_NO_ERROR);
    }
    return 0;
  }

  void MakeCallbacks() {
    for (auto** callbacks : {&server_callbacks_, &client_callbacks_}) {
      nghttp2_session_callbacks_new(callbacks);
      nghttp2_session_callbacks_set_on_begin_headers_callback(*callbacks, OnBeginHeaders);
      nghttp2_session_callbacks_set_on_header_callback(*callbacks, OnHeader);
      nghttp2_session_callbacks_set_on_frame_recv_callback(*callbacks, OnFrameReceived);
      nghttp2_session_callbacks_set_on_data_chunk_recv_callback(*callbacks, OnDataChunk);
      nghttp2_session_callbacks_set_on_stream_close_callback(*callbacks, OnStreamClose);
    }
  }

 private:
  std::string control_;
  bool retry_;
  int listen_fd_ = -1, epoll_fd_ = -1;
  nghttp2_session_callbacks* server_callbacks_ = nullptr;
  nghttp2_session_callbacks* client_callbacks_ = nullptr;
  std::unordered_map<int, std::unique_ptr<Connection>> connections_;
  std::unordered_map<std::string, Connection*> upstreams_;
  std::vector<Connection*> dirty_;
  std::vector<std::unique_ptr<Connection>> graveyard_;
  std::unordered_map<uint64_t, Call*> awaiting_;
  uint64_t next_id_ = 1;
  bool stopping_ = false;
  std::vector<Event> events_;
};


// ---- the Python module -----------------------------------------------------------------

Proxy* Running() {
  if (g_proxy == nullptr) PyErr_SetString(PyExc_RuntimeError, "the native data plane is not running");
  return g_proxy;
}

PyObject* Start(PyObject*, PyObject* args) {
  const char* listen;
  const char* control;
  int retry_on_failure;
  if (!PyArg_ParseTuple(args, "ssp", &listen, &control, &retry_on_failure)) return nullptr;
  if (g_proxy != nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "the native data plane is already running");
    return nullptr;
  }
  auto proxy = std::make_unique<Proxy>(control, retry_on_failure != 0);
  proxy->MakeCallbacks();
  int port = 0;
  std::string error;
  if (!proxy->Start(listen, &port, &error)) {
    PyErr_Format(PyExc_OSError, "cannot listen on %s: %s", listen, error.c_str());
    return nullptr;
  }
  int fd = proxy->epoll_fd();
  g_proxy = proxy.release();  // nghttp2's callbacks reach it here
  return Py_BuildValue("(ii)", port, fd);
}

PyObject* OptionalFloat(const std::optional<double>& value) {
  if (value) return PyFloat_FromDouble(*value);
  Py_RETURN_NONE;
}

PyObject* EventTuple(const Event& event) {
  switch (event.kind) {
    case kRoute: {
      PyObject* metadata = PyTuple_New(static_cast<Py_ssize_t>(event.metadata.size()));
      if (metadata == nullptr) return nullptr;
      for (size_t i = 0; i < event.metadata.size(); ++i) {
        const auto& [key, value] = event.metadata[i];
        PyObject* pair = Py_BuildValue(
            "(NN)", PyUnicode_DecodeLatin1(key.data(), static_cast<Py_ssize_t>(key.size()), nullptr),
            PyUnicode_DecodeLatin1(value.data(), static_cast<Py_ssize_t>(value.size()), nullptr));
        if (pair == nullptr) {
          Py_DECREF(metadata);
          return nullptr;
        }
        PyTuple_SET_ITEM(metadata, static_cast<Py_ssize_t>(i), pair);
      }
      return Py_BuildValue("(iKy#NNO)", event.kind, event.id, event.request.data(),
                           static_cast<Py_ssize_t>(event.request.size()), metadata,
                           OptionalFloat(event.time_remaining_s),
                           event.streaming ? Py_True : Py_False);
    }
    case kEnded:
      return Py_BuildValue("(iKiNidNO)", event.kind, event.id, event.status,
                           PyUnicode_DecodeUTF8(event.details.data(),
                                                static_cast<Py_ssize_t>(event.details.size()),
                                                "replace"),
                           event.responses, event.latency_s, OptionalFloat(event.ttft_s),
                           event.error_in_stream ? Py_True : Py_False);
    case kLost:
      return Py_BuildValue("(iKiN)", event.kind, event.id, event.status,
                           PyUnicode_DecodeUTF8(event.details.data(),
                                                static_cast<Py_ssize_t>(event.details.size()),
                                                "replace"));
  }
  Py_RETURN_NONE;
}

PyObject* EventList(std::vector<Event> events) {
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(events.size()));
  if (list == nullptr) return nullptr;
  for (size_t i = 0; i < events.size(); ++i) {
    PyObject* item = EventTuple(events[i]);
    if (item == nullptr) {
      Py_DECREF(list);
      return nullptr;
    }
    PyList_SET_ITEM(list, static_cast<Py_ssize_t>(i), item);
  }
  return list;
}

PyObject* Poll(PyObject*, PyObject*) {
  Proxy* proxy = Running();
  if (proxy == nullptr) return nullptr;
  proxy->Poll();
  return EventList(proxy->TakeEvents());
}

PyObject* TakeEvents(PyObject*, PyObject*) {
  Proxy* proxy = Running();
  return proxy == nullptr ? nullptr : EventList(proxy->TakeEvents());
}

PyObject* Forward(PyObject*, PyObject* args) {
  unsigned long long id;
  const char *address, *request_id, *model;
  int wants_empty_final = 0;
  if (!PyArg_ParseTuple(args, "Ksss|p", &id, &address, &request_id, &model, &wants_empty_final))
    return nullptr;
  Proxy* proxy = Running();
  if (proxy == nullptr) return nullptr;
  Decision decision{Decision::kForward, id, address, request_id, model};
  decision.wants_empty_final = wants_empty_final != 0;
  proxy->Apply(std::move(decision));
  Py_RETURN_NONE;
}

PyObject* Reject(PyObject*, PyObject* args) {
  unsigned long long id;
  int code;
  const char *message, *request_id, *model;
  if (!PyArg_ParseTuple(args, "Kisss", &id, &code, &message, &request_id, &model))
    return nullptr;
  Proxy* proxy = Running();
  if (proxy == nullptr) return nullptr;
  proxy->Apply(Decision{Decision::kReject, id, "", request_id, model, message, code});
  Py_RETURN_NONE;
}

PyObject* Flush(PyObject*, PyObject*) {
  Proxy* proxy = Running();
  if (proxy == nullptr) return nullptr;
  proxy->Settle();  // sending can end requests too (a reset sent for a cancelled client)
  return EventList(proxy->TakeEvents());
}

PyObject* BeginStop(PyObject*, PyObject*) {
  Proxy* proxy = Running();
  if (proxy == nullptr) return nullptr;
  proxy->Apply(Decision{Decision::kStop});
  proxy->Settle();
  return PyLong_FromSize_t(proxy->ActiveStreams());
}

PyObject* ActiveStreams(PyObject*, PyObject*) {
  Proxy* proxy = Running();
  return proxy == nullptr ? nullptr : PyLong_FromSize_t(proxy->ActiveStreams());
}

PyObject* Close(PyObject*, PyObject*) {
  Proxy* proxy = Running();
  if (proxy == nullptr) return nullptr;
  proxy->CloseAll();
  PyObject* events = EventList(proxy->TakeEvents());
  g_proxy = nullptr;
  delete proxy;
  return events;
}

PyMethodDef kMethods[] = {
    {"start", Start, METH_VARARGS,
     "start(listen_address, control_address, retry_on_failure) -> (port, fd to watch)"},
    {"poll", Poll, METH_NOARGS,
     "poll() -> events: serve every socket that is ready (call when the fd is readable)"},
    {"flush", Flush, METH_NOARGS,
     "flush() -> events: send what poll() and the decisions since produced (after each "
     "batch); the events that sending produced"},
    {"take_events", TakeEvents, METH_NOARGS, "take_events() -> events not yet taken"},
    {"forward", Forward, METH_VARARGS,
     "forward(id, address, request_id, model, wants_empty_final=False): send a request to an "
     "instance (on the next flush)"},
    {"reject", Reject, METH_VARARGS,
     "reject(id, status_code, message, request_id, model): answer it with an error (on the "
     "next flush)"},
    {"begin_stop", BeginStop, METH_NOARGS,
     "begin_stop() -> active streams: stop listening, fail requests awaiting a decision"},
    {"active_streams", ActiveStreams, METH_NOARGS, "active_streams() -> client streams open"},
    {"close", Close, METH_NOARGS, "close() -> events: close every connection, free the proxy"},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_dataplane",
                       "The router's native data plane (see router/dataplane.py).", -1,
                       kMethods};

}  // namespace

PyMODINIT_FUNC PyInit__dataplane() { return PyModule_Create(&kModule); }
